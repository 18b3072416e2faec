"""Parity with transformers on tiny random-weight checkpoints (fp32, CPU, TP=1).

Tolerance: logits within 1e-4 absolute (fp32 accumulation-order differences only).
"""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, hf_greedy, hf_model
from dist_engine import LLM, SamplingParams
from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import NullCommunicator
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.models import model_class
from dist_engine.weights.loader import load_weights
from dist_engine.worker.batch import build_batch
from dist_engine.worker.messages import SeqWork

ATOL = 1e-4
PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4]


def our_logits(path: str, tokens: list[int], chunks: list[int], block_size: int = 4,
               paged: bool = False) -> torch.Tensor:
    """Logits of every position, feeding ``tokens`` in chunks through the paged cache
    (``paged``: chunks of up to 16 tokens through the C kernel over block tables)."""
    cfg = ModelConfig.from_pretrained(path)
    model = model_class(cfg.architecture)(cfg, NullCommunicator(), torch.float32, 512)
    load_weights(model, path)
    attn = model.model.layers[0].self_attn
    blocks = 32
    caches = [LayerKV(torch.zeros(blocks * block_size, attn.local_num_kv_heads, attn.head_dim),
                      torch.zeros(blocks * block_size, attn.local_num_kv_heads, attn.head_dim))
              for _ in range(cfg.num_hidden_layers)]
    table = tuple(reversed(range(1, blocks)))  # non-trivial block ids
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            work = SeqWork(0, tuple(tokens[start:start + n]), start, table, True)
            b = build_batch((work,), block_size, [cfg.sliding_window],
                            attn.local_num_heads // attn.local_num_kv_heads, torch.float32, torch.device("cpu"),
                            paged=paged)
            hidden = model(b.ids, b.positions, caches, b.meta)
            out.append(model.compute_logits(hidden))
            start += n
    return torch.cat(out)


def hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(path)(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch):
    path = tiny_models(arch)
    ref = hf_logits(path, PROMPT)
    ours = our_logits(path, PROMPT, [len(PROMPT)])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu-flash", "explicit-tiled", "explicit"])
@pytest.mark.parametrize("unfold", [False, True], ids=["folded", "unfolded"])
@pytest.mark.parametrize("arch", ["llama", "llama1kv", "mistral", "qwen3", "deepseek_v3"])
def test_attention_layouts_match(tiny_models, monkeypatch, arch, unfold, kernel):
    """Both mask layouts (G query heads folded into the query axis, or one mask shared by all
    heads, used for long chunks over long contexts) and both kernels (PyTorch's fused CPU one,
    and the explicit one CUDA runs: tiled over a few keys at a time and merged by log-sum-exp, or
    in one tile with a plain softmax, decode tokens included) give transformers' logits, with
    cached context under the long chunk."""
    from dist_engine.layers import attention
    from dist_engine.worker import batch

    if unfold:
        monkeypatch.setattr(batch, "UNFOLD_MIN_KEYS", 0)
    if kernel != "cpu-flash":
        monkeypatch.setattr(attention, "_CPU_FLASH", None)
    if kernel == "explicit-tiled":
        monkeypatch.setattr(attention, "MAX_SCORE_ELEMENTS", 5 * 18 * 4 * 3)
    path = tiny_models(arch)
    ours = our_logits(path, PROMPT, [2, 17, 1])
    torch.testing.assert_close(ours, hf_logits(path, PROMPT), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_chunked_prefill_and_decode_match(tiny_models, arch):
    """Cached context + new chunk, and single-token steps, give the same logits as one pass."""
    path = tiny_models(arch)
    ref = hf_logits(path, PROMPT)
    ours = our_logits(path, PROMPT, [7, 6, 1, 1, 5])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(tiny_models, arch):
    path = tiny_models(arch)
    expected = hf_greedy(path, PROMPT, 32)
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64, block_size=8)
    try:
        out = llm.generate(prompt_token_ids=[PROMPT],
                           sampling_params=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        assert out[0].outputs[0].token_ids == expected
    finally:
        llm.shutdown()


def test_logprobs_match_transformers(tiny_models):
    path = tiny_models("llama")
    ref = torch.log_softmax(hf_logits(path, PROMPT)[-1], -1)
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64)
    try:
        out = llm.generate(prompt_token_ids=[PROMPT],
                           sampling_params=SamplingParams(temperature=0, max_tokens=1, logprobs=5))
        top = out[0].outputs[0].logprobs[0]
        assert len(top) == 5
        for tok, lp in top.items():
            assert abs(lp - ref[tok].item()) < ATOL
        assert max(top, key=top.get) == int(ref.argmax())
    finally:
        llm.shutdown()
