"""GPU check for a lent machine (torch on CUDA, no Ray, in-process executor only).

    python bench/gpu_check.py [--out bench/results/gpu_check.json]

1. Parity with transformers on CUDA: a tiny random Llama (9 query / 3 KV heads), fp32 logits and
   32 greedy tokens.
2. Decode tok/s, batch 1, bf16, on random weights of the default model's shape (135M) and of a
   ~1B Llama shape, against the HBM-bandwidth limit (weight bytes / bandwidth per token).
Needs only torch, transformers and safetensors; makes its checkpoints in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           tie_word_embeddings=True),
}
HBM_BYTES_PER_S = 4.8e12  # H200


def make(path: str, **kw) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def parity(tmp: str) -> dict:
    from transformers import AutoModelForCausalLM

    from dist_engine import LLM, SamplingParams

    path = make(os.path.join(tmp, "tiny"), hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=320)
    prompt = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt], device="cuda")
        ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
        ref_lp = torch.log_softmax(hf(ids).logits[0, -1].float(), -1)
    llm = LLM(path, device="cuda", skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        temperature=0, max_tokens=32, ignore_eos=True, logprobs=5))[0].outputs[0]
    llm.shutdown()
    err = max(abs(lp - ref_lp[t].item()) for t, lp in out.logprobs[0].items())
    return {"greedy_identical": out.token_ids == ref, "max_logprob_err": err}


def decode_speed(tmp: str, name: str, kw: dict, tokens: int = 128) -> dict:
    from dist_engine import LLM, SamplingParams

    path = make(os.path.join(tmp, name), **kw)
    llm = LLM(path, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
              num_kv_blocks=256)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=[[1] * 32], sampling_params=SamplingParams(temperature=0, max_tokens=8))
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompt_token_ids=[[1] * 32], sampling_params=sp)
    torch.cuda.synchronize()
    tok_s = tokens / (time.perf_counter() - t)
    weight_bytes = llm.engine.executor.cache_info()["weight_bytes"]
    llm.shutdown()
    limit = HBM_BYTES_PER_S / weight_bytes
    return {"tok_s": tok_s, "weight_bytes": weight_bytes, "hbm_limit_tok_s": limit,
            "fraction_of_limit": tok_s / limit}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu_check.json"))
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        res["parity"] = parity(tmp)
        print(res["parity"], flush=True)
        for name, kw in SHAPES.items():
            res[name] = decode_speed(tmp, name, kw)
            print(name, res[name], flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
