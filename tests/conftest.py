"""Shared fixtures: tiny random-weight checkpoints of each architecture, one Ray per session."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (transformers config class, kwargs)
TINY = {
    # 9 query / 3 KV heads like the default model: TP=2 splits them 6+3 / 2+1
    "llama": ("LlamaConfig", dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=100, tie_word_embeddings=True)),
    "llama1kv": ("LlamaConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                      intermediate_size=96)),
    # the same shape with room for prompts of thousands of tokens
    "llama1kv_long": ("LlamaConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                           intermediate_size=96, max_position_embeddings=6144)),
    "llama3rope": ("LlamaConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=96, rope_scaling={
                                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2yarn": ("Qwen2Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=96, rope_scaling={
                                           "rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 32})),
    # MLA (q LoRA, interleaved RoPE, YaRN with DeepSeek's mscale) + MoE (8 experts in 2 groups,
    # 2 per token, a shared expert) after one dense layer
    "deepseek_v3": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=24,
        v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})),
    # no q LoRA, plain RoPE, ungrouped routing without normalisation
    "deepseek_v3_plain": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=6, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, first_k_dense_replace=0,
        rope_interleave=False)),
    # Qwen3 attention with softmax-routed MoE (8 experts, 2 per token, renormalised) in every
    # second layer
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=96, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=24, intermediate_size=96)),
}

# architectures the parity and TP tests sweep ("_long" variants only add positions)
ARCHS = sorted(name for name in TINY if not name.endswith("_long"))


def make_tiny(name: str, path: str, seed: int = 0, **overrides) -> str:
    """``TINY[name]`` with random weights at ``path``; ``overrides`` change its config."""
    import transformers

    cls_name, kw = TINY[name]
    kw = {**kw, **overrides}
    cfg = getattr(transformers, cls_name)(**{
        "vocab_size": 320, "num_hidden_layers": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "bos_token_id": 1, "eos_token_id": 2, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so logits are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path


def built_on_demand(tmp_path_factory, folder: str, make):
    """A getter building each named checkpoint with ``make(name, path)`` on its first use."""
    root = tmp_path_factory.mktemp(folder)
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = make(name, str(root / name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return built_on_demand(tmp_path_factory, "tiny", make_tiny)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama over the default model's tokenizer and chat template (its vocabulary
    of 49152): real tokenization and chat prompts at the cost of a toy model."""
    import shutil

    from dist_engine.weights.registry import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    out = str(tmp_path_factory.mktemp("tiny_chat"))
    make_tiny("llama", out, vocab_size=49152)  # <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(src, name), out)
    return out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 log_to_driver=True)
    yield ray
    ray.shutdown()


def graft_tiny(path: str, out: str, device: str = "cpu") -> dict:
    """Graft an MTP layer onto the tiny model at ``path`` from its own generations (made on
    ``device``), into ``out``; returns graft's report. About 20 s on CPU."""
    import random

    from dist_engine import LLM, SamplingParams
    from dist_engine.graft.data import save_hidden
    from dist_engine.graft.train import graft

    r = random.Random(0)
    prompts = [[1] + [r.randrange(3, 320) for _ in range(r.randrange(4, 12))] for _ in range(500)]
    with LLM(path, device=device, skip_tokenizer_init=True, max_model_len=128) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
            max_tokens=40, ignore_eos=True, return_hidden_states=True))
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    # the teacher signal as graft-mtp gets it: hidden states the engine returned while generating
    save_hidden(os.path.join(out, "hidden"), "0", seqs, [o.outputs[0].hidden_states.cpu() for o in outs])
    meta = graft(path, seqs[:450], seqs[450:], out, epochs=5, depth=3, lr=3e-3, batch_size=16,
                 draft_vocab_size=320, dtype="float32", hidden_dir=os.path.join(out, "hidden"))
    with open(os.path.join(out, "seqs.json"), "w") as f:  # for a test that continues the graft
        json.dump(seqs, f)
    return meta


@pytest.fixture(scope="session")
def grafted(tiny_models, tmp_path_factory):
    """The tiny Llama with an MTP layer grafted on its own generations (about 20 s)."""
    path = tiny_models("llama")
    out = str(tmp_path_factory.mktemp("graft"))
    return path, out, graft_tiny(path, out)


@pytest.fixture(scope="session")
def with_mtp_layer(tiny_models, tmp_path_factory):
    """The tiny DeepSeek-V3 plus a native MTP layer at model.layers.2 (an MoE block with MLA,
    enorm/hnorm/eh_proj/shared_head), as DeepSeek ships it; num_nextn_predict_layers = 1."""
    import json
    import shutil

    import transformers
    from safetensors.torch import save_file

    src = tiny_models("deepseek_v3")
    out = str(tmp_path_factory.mktemp("ds_mtp"))
    shutil.copytree(src, out, dirs_exist_ok=True)
    cfg = transformers.DeepseekV3Config(vocab_size=320, num_hidden_layers=3, max_position_embeddings=512,
                                        **TINY["deepseek_v3"][1])
    torch.manual_seed(7)
    block = transformers.AutoModelForCausalLM.from_config(cfg).model.layers[2]
    H = cfg.hidden_size
    state = {k: v.detach().normal_(0, 0.08) if v.dim() > 1 else v.detach() for k, v in block.state_dict().items()}
    # transformers holds experts fused ([E, 2I, H], [E, H, I]); checkpoints name each expert
    gate_up, down = state.pop("mlp.experts.gate_up_proj"), state.pop("mlp.experts.down_proj")
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        state[f"mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :inter]
        state[f"mlp.experts.{e}.up_proj.weight"] = gate_up[e, inter:]
        state[f"mlp.experts.{e}.down_proj.weight"] = down[e]
    tensors = {f"model.layers.2.{k}": v for k, v in state.items()}
    extra = {"enorm.weight": torch.ones(H), "hnorm.weight": torch.ones(H),
             "eh_proj.weight": torch.randn(H, 2 * H) * 0.08, "shared_head.norm.weight": torch.ones(H),
             "shared_head.head.weight": torch.zeros(320, H), "embed_tokens.weight": torch.zeros(320, H)}
    tensors.update({f"model.layers.2.{k}": v for k, v in extra.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/mtp-layer.safetensors")
    with open(f"{out}/config.json") as f:
        c = json.load(f)
    c["num_nextn_predict_layers"] = 1
    with open(f"{out}/config.json", "w") as f:
        json.dump(c, f)
    return out
# Qwen3.5 hybrids (not in TINY: they need per-kind caches): three Gated DeltaNet layers then
# gated attention, 2 key / 4 value linear heads (TP=2: one key head with its two value heads per
# rank), dense or MoE (8 experts, 2 per token, a gated shared expert). No EOS: transformers'
# min_new_tokens bans it from the argmax where ignore_eos does not.
QWEN3_5_SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=24, max_position_embeddings=1024,
                     rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=None)
QWEN3_5 = {
    "qwen3_5": ("Qwen3_5TextConfig", dict(intermediate_size=96)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                                 num_experts=8, num_experts_per_tok=2)),
}


def randomise_qwen3_5(module: torch.nn.Module) -> None:
    """Every parameter random, those transformers initialises to constants included: (1 + w)
    norms around 1, the gated norm's plain weight around 1, decays exp(-exp(A_log) *
    softplus(a + dt_bias)) from about 0.99 to 0.3 per token (state carried over many chunks)."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("A_log"):
                p.uniform_(-4.0, 0.0)
            elif n.endswith("dt_bias"):
                p.normal_(-1.0, 0.5)
            elif n.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.2)
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
            elif "conv1d" in n:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.08)


def make_qwen3_5(name: str, path: str, mtp: bool = True, seed: int = 0, **shape) -> str:
    """A tiny random Qwen3.5 checkpoint (``shape`` overrides config fields: the benchmark's
    larger one) written by transformers; with ``mtp``, plus an MTP
    module in Qwen3.5's naming (``mtp.*`` in its own file, which transformers does not read;
    the MoE layer's experts fused as ``experts.gate_up_proj`` / ``down_proj``, as transformers
    holds them) and ``mtp_num_hidden_layers`` in config.json."""
    import transformers
    from safetensors.torch import save_file
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

    cls_name, kw = QWEN3_5[name]
    cfg = getattr(transformers, cls_name)(**{**QWEN3_5_SHAPE, **kw, **shape})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomise_qwen3_5(model)
    model.save_pretrained(path, safe_serialization=True)
    if mtp:
        full = cfg.layer_types.index("full_attention")
        H = cfg.hidden_size
        mod = torch.nn.Module()
        mod.layer = (Qwen3_5MoeDecoderLayer if "Moe" in cls_name else Qwen3_5DecoderLayer)(cfg, full)
        mod.pre_fc_norm_embedding, mod.pre_fc_norm_hidden, mod.norm = (Qwen3_5RMSNorm(H) for _ in range(3))
        mod.fc = torch.nn.Linear(2 * H, H, bias=False)
        randomise_qwen3_5(mod)
        tensors = {("mtp.layers.0." + k[len("layer."):] if k.startswith("layer.") else "mtp." + k): v.contiguous()
                   for k, v in mod.state_dict().items()}
        save_file(tensors, os.path.join(path, "model-mtp.safetensors"))
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**raw, "mtp_num_hidden_layers": 1}, f, indent=1)
    return path


@pytest.fixture(scope="session")
def qwen3_5_models(tmp_path_factory):
    return built_on_demand(tmp_path_factory, "qwen3_5", make_qwen3_5)


@pytest.fixture(scope="session")
def qwen3_5_generated(qwen3_5_models):
    """transformers' cached greedy generation: 32 tokens after the tests' first 150-token
    prompt (``qwen3_5_harness.PROMPT``)."""
    from qwen3_5_harness import PROMPT

    cache = {}

    def get(name: str) -> list[int]:
        if name not in cache:
            cache[name] = hf_greedy(qwen3_5_models(name), PROMPT[:150], 32)
        return cache[name]

    return get


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    model = hf_model(path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture
def dflash_blocks(monkeypatch) -> list:
    """Every block the DFlash drafter proposes while the test runs: ``([(position, token) of
    each sequence's plan], draft logits)`` per call."""
    from dist_engine.worker.spec_dflash import DFlashDecoder

    blocks = []
    real = DFlashDecoder._propose_blocks

    def recording(self, plans):
        out = real(self, plans)
        blocks.append(([(p, tok) for _, p, tok in plans], out.clone()))
        return out

    monkeypatch.setattr(DFlashDecoder, "_propose_blocks", recording)
    return blocks


@pytest.fixture
def oracle_drafts(monkeypatch):
    """``install(decoder_class, text)``: the drafter still computes its drafts, but they are
    replaced by ``text`` (the plain continuation) except at every third position, so that a
    random drafter's drafts are both accepted and rejected."""

    def install(decoder_class, text: list[int]) -> None:
        real = decoder_class.draft_tokens

        def oracle(self, logits, ids, seqs, specs, positions):
            real(self, logits, ids, seqs, specs, positions)
            return [text[p] if p < len(text) and p % 3 else 0 for p in positions]

        monkeypatch.setattr(decoder_class, "draft_tokens", oracle)

    return install

