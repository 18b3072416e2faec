"""The DeepSeek-V4 part of ``bench/gpu_check.py`` (``--parts deepseek_v4``).

1. Parity on the device: the tests' tiny V4 (every layer type, hash routing, a 16-token window,
   top-3 indexer; tests/v4_checkpoints.py) in fp32 against transformers on the same device: 24
   greedy tokens after a 71-token prompt identical, largest top-5 logprob error; the same
   with native MTP (K=2) identical to plain.
2. Decode step time against context (1K..32K; 256 and 512 with ``--quick``) for the benchmark's small
   V4 shape against the dense-attention Llama of its size (bench/bench_deepseek_v4.py), bf16.
"""

from __future__ import annotations

import random

import torch


def parity(tmp: str, dev: str) -> dict:
    from v4_checkpoints import random_mtp, random_v4, save_v4

    from dist_engine import LLM, SamplingParams

    model = random_v4(0)
    _, mtp = random_mtp(5)
    path = save_v4(model, f"{tmp}/v4-tiny", extra=mtp)
    r = random.Random(4)
    prompt = [1] + [r.randrange(3, 320) for _ in range(70)]
    model = model.to(dev)
    with torch.inference_mode():
        seq = list(prompt)
        for _ in range(24):  # uncached: transformers' own attention over the whole sequence
            seq.append(int(model(torch.tensor([seq], device=dev), use_cache=False).logits[0, -1].argmax()))
        ref_lp = torch.log_softmax(model(torch.tensor([prompt], device=dev), use_cache=False).logits[0, -1].float(), -1)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    kw = dict(device=dev, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=48, max_num_batched_tokens=40)
    with LLM(path, speculative="none", **kw) as llm:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0]
    with LLM(path, speculative="mtp", num_speculative_tokens=2, **kw) as llm:
        spec = llm.generate(prompt_token_ids=[prompt], sampling_params=sp)[0].outputs[0]
    err = max(abs(lp - ref_lp[t].item()) for t, lp in out.logprobs[0].items())
    return {"greedy_identical": out.token_ids == seq[len(prompt):], "max_logprob_err": err,
            "mtp_k2_identical": spec.token_ids == out.token_ids}


def step_times(tmp: str, dev: str, quick: bool) -> dict:
    import bench_deepseek_v4 as B

    from dist_engine import LLM, SamplingParams

    contexts = [256, 512] if quick else [1024, 4096, 16384, 32768]
    sp = SamplingParams(temperature=0, max_tokens=33, ignore_eos=True)
    res: dict = {}
    for kind in ("v4", "dense"):
        with LLM(B.write_small(tmp, kind), device=dev, dtype="bfloat16", skip_tokenizer_init=True,
                 speculative="none", max_model_len=max(contexts) + 64, max_num_batched_tokens=4096,
                 kv_cache_memory="2GiB", enable_prefix_caching=False, max_num_seqs=1) as llm:
            g = torch.Generator().manual_seed(1)
            for n in contexts:
                ids = [1] + torch.randint(3, 1024, (n - 1,), generator=g).tolist()
                m = llm.generate(prompt_token_ids=[ids], sampling_params=sp)[0].metrics
                res.setdefault(kind, {})[n] = 1e3 * (m.last_token_time - m.first_token_time) / 32
    res["dense_over_v4"] = {n: res["dense"][n] / res["v4"][n] for n in contexts}
    return res


def report(res: dict) -> list[str]:
    p, s = res.get("parity", {}), res.get("steps", {})
    lines = ["", "## DeepSeek-V4 (tiny parity fp32; small shape decode step ms, bf16)", "",
             f"- parity: greedy identical {p.get('greedy_identical', p.get('error'))}, max top-5 logprob "
             f"error {p.get('max_logprob_err')}, MTP K=2 identical {p.get('mtp_k2_identical')}"]
    if "v4" in s:
        lines += ["", "| context | V4 ms/step | dense ms/step | dense / V4 |", "|---|---|---|---|"]
        lines += [f"| {n} | {s['v4'][n]:.2f} | {s['dense'][n]:.2f} | {s['dense_over_v4'][n]:.2f}x |" for n in s["v4"]]
    elif s:
        lines.append(f"- step times: {s.get('error')}")
    return lines
