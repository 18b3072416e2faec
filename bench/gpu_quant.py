"""The quantization part of ``bench/gpu_check.py`` (``--parts quant``): quantized weights on a
lent GPU.

1. Correctness on the device: a tiny checkpoint of each format (tests/quant_writers.py:
   compressed-tensors int4 / FP8 / NVFP4 / MXFP4 written by its library, GPTQ with activation
   order, AWQ, ModelOpt NVFP4, FP8 tensor / block) and ``--quantization int8|int4``: greedy
   tokens against the float model of the weights each format stands for, max logit error.
   (FP8 per-row scales go through ``torch._scaled_mm``, which quantizes activations to FP8:
   its error is reported, not held to fp32's.)
2. Speed, random weights of the default model's shape in bf16: batch-1 and 16-concurrent decode
   tok/s for bf16, ``--quantization int4`` (torch's tinygemm int4 kernel) and int8
   (dequantized per call), with CUDA graphs, against the weight bytes read per token.
"""

from __future__ import annotations

import os
import time

import torch

FORMATS = ("ct-int4-asym-g32", "ct-fp8-channel", "ct-nvfp4", "ct-mxfp4", "gptq-int4-act-order",
           "awq-int4-g32", "fp8-tensor", "fp8-block", "modelopt-nvfp4")
PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33]


def correctness(tmp: str, dev: str) -> dict:
    import quant_writers as W
    from test_quant_formats import FORMATS as WRITERS

    from dist_engine import LLM, SamplingParams

    res = {}
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    kw = dict(device=dev, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, speculative="none")
    cases = [(f, {}) for f in FORMATS] + [("float-int8", {"quantization": "int8"}),
                                          ("float-int4", {"quantization": "int4"})]
    for name, extra in cases:
        path = os.path.join(tmp, name)
        try:
            if name.startswith("float-"):
                ref_model = W.float_model()
                ref_model.save_pretrained(path)
                from dist_engine.quant.groups import quantize

                bits = 8 if extra["quantization"] == "int8" else 4
                with torch.no_grad():
                    for n, p in ref_model.named_parameters():
                        if p.dim() == 2 and "embed_tokens" not in n:
                            p.copy_(quantize(p, bits, 32, bits == 8).dequantize())
            else:
                ref_model = WRITERS[name](path)
            ref_model = ref_model.to(dev)
            with torch.inference_mode():
                ids = torch.tensor([PROMPT], device=dev)
                ref = ref_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                         pad_token_id=0)[0, len(PROMPT):].tolist()
                ref_lp = torch.log_softmax(ref_model(ids).logits[0, -1].float(), -1)
            with LLM(path, **kw, **extra) as llm:
                out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=sp)[0].outputs[0]
            first = out.logprobs[0]
            res[name] = {"greedy_identical": out.token_ids == ref,
                         "first_logprob_err": max(abs(lp - ref_lp[t].item()) for t, lp in first.items())}
        except Exception as e:  # noqa: BLE001 - a failed format is a result too
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


def speed(tmp: str, dev: str, make_shape, shape: dict, tokens: int) -> dict:
    from dist_engine import LLM, SamplingParams

    path = make_shape(tmp, "quant-shape", shape, dev, mtp=False)
    prompt = [[1] + [(7 * i) % 1000 + 3 for i in range(31)]]
    many = [[1, 5 + i] + prompt[0][2:] for i in range(16)]
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    res = {}
    for label, extra in (("bf16", {}), ("int4", {"quantization": "int4"}), ("int8", {"quantization": "int8"})):
        with LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
                 num_kv_blocks=2048, speculative="none", **extra) as llm:
            llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(temperature=0, max_tokens=8))
            r = {"weight_bytes": llm.engine.cache_info["weight_bytes"]}
            for key, prompts in (("tok_s", prompt), ("c16_tok_s", many)):
                torch.cuda.synchronize()
                t = time.perf_counter()
                outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
                torch.cuda.synchronize()
                r[key] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
            res[label] = r
    for label in ("int4", "int8"):
        res[label]["vs_bf16"] = res[label]["tok_s"] / res["bf16"]["tok_s"]
    return res


def report(res: dict) -> list[str]:
    lines = ["", "## Quantized weights on the device", "",
             "| checkpoint | greedy identical | first-token logprob error |", "|---|---|---|"]
    for name, r in (res.get("correctness") or {}).items():
        lines.append(f"| {name} | {r.get('greedy_identical', r.get('error'))} | {r.get('first_logprob_err', '')} |")
    sp = res.get("speed") or {}
    if "bf16" in sp:
        lines += ["", "| weights | batch-1 tok/s | 16 concurrent tok/s | weight bytes | vs bf16 |", "|---|---|---|---|---|"]
        for label, r in sp.items():
            lines.append(f"| {label} | {r['tok_s']:.0f} | {r['c16_tok_s']:.0f} | {r['weight_bytes'] / 2**20:.0f} MiB "
                         f"| {r.get('vs_bf16', 1.0):.2f}x |")
    elif sp:
        lines.append(f"- speed: {sp.get('error')}")
    return lines
