"""Quantized weights on CPU: ours against llama.cpp, one run, engines taking turns.

    python bench/bench_quant.py [--tokens 128] [--reps 3] [--skip-llamacpp] [--parts speed,concurrent,mtp]

Run it with ``OMP_WAIT_POLICY=passive`` on a shared machine: a dozen engines live in this one
process, and spinning OpenMP pools (torch's, the kernels', llama.cpp's) steal each other's
cores (a first run without it decoded at 0.3 tok/s).

Default model (SmolLM2-135M-Instruct, shipped as Q4_1 GGUF). llama.cpp (``pip install
".[llamacpp]"``) runs its own requantization of the shipped file to F32 / F16 / Q8_0 and the
shipped Q4_1 itself, so every row holds the same weights (our "float-codes" rows: the GGUF
engines with their products turned to codes as floats, the path before the digit path became
the default on VNNI CPUs, bench_qlinear.py); our fp32 / bf16 rows and
transformers' read the dequantized HF folder, our GGUF rows the same GGUF files, int8 / int4 quantize the fp32 folder
at load. Parts:

1. batch-1 decode tok/s (chat prompt, 128 greedy tokens; each engine keeps its best round),
   ratios at matched precision and best against best;
2. perplexity of every engine on one fixed text (``bench/assets/perplexity_text.txt``, our
   tokenizer for all, windows of 256 tokens);
3. 16 concurrent requests, tok/s: int8 / int4 / GGUF against fp32;
4. MTP speculation (K=3, the shipped graft; and with its drafter at 4 bits too, and the default
   K=1 on the shipped file) with 4-bit weights against plain 4-bit decoding.

Writes bench/results/quant.{json,md}. The machine is shared: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time

import torch

PROMPT = "Write a Python function that checks whether a number is prime."
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
WINDOW = 256
# llama.cpp's file types (llama.h LLAMA_FTYPE_*)
LLAMACPP_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_1": 3}


def llamacpp_files(shipped: str, tmp: str) -> dict[str, str]:
    import llama_cpp

    files = {"Q4_1": shipped}

    def quantize(src: str, name: str, ftype: int) -> str:
        out = os.path.join(tmp, f"model-{name.replace(' ', '-')}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = ftype, True
        if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not requantize to {name}")
        return out

    for name, ftype in LLAMACPP_TYPES.items():
        if name != "Q4_1":
            files[name] = quantize(shipped, name, ftype)
    # Q4_1 made by llama.cpp from the F32 file: the values our int4-at-load row quantizes, so the
    # two 4-bit quantizers meet on the same input (the shipped Q4_1 came from the true weights)
    files["Q4_1 from F32"] = quantize(files["F32"], "Q4_1 from F32", LLAMACPP_TYPES["Q4_1"])
    return files


class Ours:
    def __init__(self, **kw) -> None:
        from dist_engine import LLM

        # a fixed KV budget: a dozen engines share the machine's memory
        self.llm = LLM(max_model_len=1024, enable_prefix_caching=False, kv_cache_memory="256MiB", **kw)

    def decode(self, ids: list[int], n: int) -> float:
        from dist_engine import SamplingParams

        t = time.perf_counter()
        out = self.llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == n
        return n / (time.perf_counter() - t)

    def nll(self, window: list[int]) -> float:
        """Summed negative log-likelihood of tokens 1.. of ``window`` (the engine's own head)."""
        from dist_engine import SamplingParams

        out = self.llm.generate(prompt_token_ids=[window], sampling_params=SamplingParams(
            temperature=0, max_tokens=1, return_hidden_states=True))
        hidden = out[0].outputs[0].hidden_states[:len(window) - 1]
        runner = self.llm.engine.executor.worker.runner
        with torch.inference_mode():
            logits = runner.model.compute_logits(hidden.to(runner.dtype)).float()
        return -torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:]).unsqueeze(1)).sum().item()

    def close(self) -> None:
        self.llm.shutdown()


class OursFloatCodes(Ours):
    """Ours with its quantized products taking float activations the older way, codes turned
    into floats (the default on VNNI CPUs is the digit path, kernels/qlinear.c): the same
    engine's speed and perplexity both ways in one run."""

    def __init__(self, **kw) -> None:
        from bench_qlinear import FloatCodes

        super().__init__(**kw)
        self.switch = FloatCodes(self.llm)

    def decode(self, ids: list[int], n: int) -> float:
        self.switch.set(True)
        try:
            return super().decode(ids, n)
        finally:
            self.switch.set(False)

    def nll(self, window: list[int]) -> float:
        self.switch.set(True)
        try:
            return super().nll(window)
        finally:
            self.switch.set(False)


class LlamaCpp:
    def __init__(self, path: str) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=1024, n_threads=os.cpu_count(), logits_all=True,
                         verbose=False)

    def decode(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        t = time.perf_counter()
        for got, _tok in enumerate(self.llm.generate(ids, temp=0.0), start=1):
            if got == n:
                break
        return n / (time.perf_counter() - t)

    def nll(self, window: list[int]) -> float:
        import numpy as np

        self.llm.reset()
        self.llm.eval(window)
        logits = torch.from_numpy(np.array(self.llm.scores[:len(window) - 1], dtype=np.float32))
        return -torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:]).unsqueeze(1)).sum().item()

    def close(self) -> None:
        self.llm.close()


class Transformers:
    """transformers' own generate on the dequantized folder (the oracle; no quantized rows)."""

    def __init__(self, path: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def decode(self, ids: list[int], n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return n / (time.perf_counter() - t)

    def nll(self, window: list[int]) -> float:
        with torch.inference_mode():
            logits = self.model(torch.tensor([window])).logits[0, :-1].float()
        return -torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:]).unsqueeze(1)).sum().item()

    def close(self) -> None:
        del self.model


def taking_turns(engines: dict, fn, reps: int, rounds: list | None = None) -> dict:
    """Each engine's best over ``reps`` rounds; every round runs all engines, in a new (seeded)
    order each time so that no engine always follows the same one. ``rounds``: gets each
    round's results."""
    best = dict.fromkeys(engines, 0.0)
    order = random.Random(0)
    for _ in range(reps):
        keys = list(engines)
        order.shuffle(keys)
        got = {key: fn(engines[key]) for key in keys}
        for key, v in got.items():
            best[key] = max(best[key], v)
        if rounds is not None:
            rounds.append(got)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--parts", default="speed,concurrent,mtp",
                    help="speed (with perplexity), concurrent, mtp: which parts to run")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    from dist_engine.weights.registry import (
        DEFAULT_MODEL,
        dequantized_folder,
        fetch_gguf,
        resolve_model,
    )

    shipped, folder = fetch_gguf(DEFAULT_MODEL), dequantized_folder(DEFAULT_MODEL)
    tmp = tempfile.mkdtemp()
    try:
        import llama_cpp  # noqa: F401

        peers = {} if a.skip_llamacpp or "speed" not in parts else llamacpp_files(shipped, tmp)
    except ImportError:
        peers = {}
        print("llama-cpp-python is not installed (pip install '.[llamacpp]'): our rows only")
    spec_off = dict(speculative="none")
    engines = {
        "ours fp32": lambda: Ours(model=folder, **spec_off),
        "ours bf16": lambda: Ours(model=folder, dtype="bfloat16", **spec_off),
        "ours GGUF Q4_1": lambda: Ours(model=DEFAULT_MODEL, **spec_off),
        "ours GGUF Q4_1 int8-act": lambda: Ours(model=DEFAULT_MODEL, int8_activations=True, **spec_off),
        "ours GGUF Q4_1 float-codes": lambda: OursFloatCodes(model=DEFAULT_MODEL, **spec_off),
        "ours int8": lambda: Ours(model=folder, quantization="int8", **spec_off),
        "ours int8 int8-act": lambda: Ours(model=folder, quantization="int8", int8_activations=True, **spec_off),
        "ours int4": lambda: Ours(model=folder, quantization="int4", **spec_off),
        "ours int4 int8-act": lambda: Ours(model=folder, quantization="int4", int8_activations=True, **spec_off),
    }
    if "F16" in peers:  # llama.cpp's F16 file: its weights kept fp16 under fp32 activations
        engines["ours GGUF F16"] = lambda: Ours(model=peers["F16"], **spec_off)
    if "Q8_0" in peers:
        engines["ours GGUF Q8_0"] = lambda: Ours(model=peers["Q8_0"], **spec_off)
        engines["ours GGUF Q8_0 int8-act"] = lambda: Ours(model=peers["Q8_0"], int8_activations=True, **spec_off)
        engines["ours GGUF Q8_0 float-codes"] = lambda: OursFloatCodes(model=peers["Q8_0"], **spec_off)
    for name, path in peers.items():
        engines[f"llama.cpp {name}"] = lambda path=path: LlamaCpp(path)
    engines["transformers fp32"] = lambda: Transformers(folder, torch.float32)
    engines["transformers bf16"] = lambda: Transformers(folder, torch.bfloat16)
    loaded = {k: make() for k, make in engines.items()} if "speed" in parts else {}
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
        ids = list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
        for e in loaded.values():
            e.decode(ids, 8)  # warm-up
        rounds: list[dict] = []
        speed = taking_turns(loaded, lambda e: e.decode(ids, a.tokens), a.reps, rounds)
        text = open(os.path.join(HERE, "assets", "perplexity_text.txt")).read()
        tokens = tok(text, add_special_tokens=False)["input_ids"]
        windows = [[tok.bos_token_id or 1] + tokens[i:i + WINDOW - 1]
                   for i in range(0, len(tokens) - WINDOW // 2, WINDOW - 1)]
        ppl = {k: math.exp(sum(e.nll(w) for w in windows) / sum(len(w) - 1 for w in windows))
               for k, e in loaded.items()}
    finally:
        for e in loaded.values():
            e.close()
    concurrent = concurrency(folder, DEFAULT_MODEL, tok) if "concurrent" in parts else None
    mtp = speculation(folder, tok, a.tokens) if "mtp" in parts else None
    write(speed, ppl, concurrent, mtp, a, len(windows), rounds)


def concurrency(folder: str, gguf: str, tok) -> dict:
    """16 requests at once, mixed prompts, 64 tokens each; engines taking turns."""
    from dist_engine import SamplingParams

    prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i} about "
                                              f"{topic}."}], add_generation_prompt=True, return_dict=True)["input_ids"])
               for i, topic in enumerate(["rivers", "stars", "bread", "trains"] * 4)]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    confs = {"fp32": dict(model=folder), "int8": dict(model=folder, quantization="int8"),
             "int4": dict(model=folder, quantization="int4"), "GGUF Q4_1": dict(model=gguf)}
    engines = {k: Ours(speculative="none", **kw) for k, kw in confs.items()}

    def run(e) -> float:
        t = time.perf_counter()
        outs = e.llm.generate(prompt_token_ids=prompts, sampling_params=sp)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    try:
        for e in engines.values():
            run(e)
        best = taking_turns(engines, run, 2)
    finally:
        for e in engines.values():
            e.close()
    return best


def speculation(folder: str, tok, n: int) -> dict:
    """K=3 with the shipped graft against plain decoding, both with int4 weights (quantized at
    load) and with the shipped Q4_1, greedy, three prompts; engines taking turns."""
    from dist_engine import SamplingParams
    from dist_engine.weights.registry import DEFAULT_MODEL

    asks = ["Explain how a hash map works.", "Write a short poem about the sea.", PROMPT]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]) for q in asks]
    k3 = dict(speculative="mtp", num_speculative_tokens=3)
    k3_int4 = dict(k3, speculative_config={"draft_dtype": "int4"})  # the drafter at 4 bits as well
    confs = {"int4 plain": dict(model=folder, quantization="int4", speculative="none"),
             "int4 K=3": dict(model=folder, quantization="int4", **k3),
             "int4 K=3 int4-draft": dict(model=folder, quantization="int4", **k3_int4),
             "GGUF Q4_1 plain": dict(model=DEFAULT_MODEL, speculative="none"),
             "GGUF Q4_1 K=1": dict(model=DEFAULT_MODEL, speculative="mtp", num_speculative_tokens=1),
             "GGUF Q4_1 K=3": dict(model=DEFAULT_MODEL, **k3),
             "GGUF Q4_1 K=3 int4-draft": dict(model=DEFAULT_MODEL, **k3_int4)}
    engines = {k: Ours(**kw) for k, kw in confs.items()}
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def run(e) -> float:
        t = time.perf_counter()
        for p in prompts:
            e.llm.generate(prompt_token_ids=[p], sampling_params=sp)
        return len(prompts) * n / (time.perf_counter() - t)

    try:
        for e in engines.values():
            e.decode(prompts[0], 8)
        best = taking_turns(engines, run, 2)
        accepted = {k: e.llm.engine.spec_stats.as_dict() for k, e in engines.items() if "K=" in k}
    finally:
        for e in engines.values():
            e.close()
    return {"tok_s": best, "spec": accepted}


def write(speed: dict, ppl: dict, conc: dict, mtp: dict, a, n_windows: int, rounds: list) -> None:
    hf = {"ours fp32": "transformers fp32", "ours bf16": "transformers bf16"}
    pairs = {"ours fp32": "llama.cpp F32", "ours bf16": "llama.cpp F16", "ours GGUF F16": "llama.cpp F16",
             "ours GGUF Q8_0": "llama.cpp Q8_0",
             "ours GGUF Q8_0 int8-act": "llama.cpp Q8_0", "ours GGUF Q8_0 float-codes": "llama.cpp Q8_0",
             "ours GGUF Q4_1 float-codes": "llama.cpp Q4_1", "ours int8": "llama.cpp Q8_0",
             "ours int8 int8-act": "llama.cpp Q8_0", "ours GGUF Q4_1": "llama.cpp Q4_1",
             "ours GGUF Q4_1 int8-act": "llama.cpp Q4_1", "ours int4": "llama.cpp Q4_1 from F32",
             "ours int4 int8-act": "llama.cpp Q4_1 from F32"}
    peers = [k for k in speed if k.startswith("llama.cpp")]
    best_peer = max((speed[k] for k in peers), default=None)
    best_ours = max((v for k, v in speed.items() if k.startswith("ours")), default=None)
    lines = [] if not speed else [
        "| engine | tok/s | vs llama.cpp at matched precision | median paired ratio | vs transformers | perplexity | vs llama.cpp's |",
        "|---|---|---|---|---|---|---|"]
    for k, v in speed.items():
        peer = pairs.get(k)
        ratio = f"{v / speed[peer]:.2f}x ({peer})" if peer in speed else ""
        # the median over rounds of the ratio within each round: a slow spell of the machine
        # moves both engines of a round alike
        paired = f"{statistics.median(r[k] / r[peer] for r in rounds):.2f}x" if peer in speed else ""
        vs_hf = f"{v / speed[hf[k]]:.2f}x" if hf.get(k) in speed else ""
        pr = f"{ppl[k] / ppl[peer]:.3f}x" if peer in ppl else ""
        lines.append(f"| {k} | {v:.1f} | {ratio} | {paired} | {vs_hf} | {ppl[k]:.3f} | {pr} |")
    if best_peer:
        lines += ["", f"Best vs best: ours {best_ours:.1f} tok/s against llama.cpp's {best_peer:.1f}: "
                      f"{best_ours / best_peer:.2f}x."]
    if conc:
        lines += ["", "16 concurrent requests (64 tokens each), tok/s:", "", "| weights | tok/s | vs fp32 |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {v / conc['fp32']:.2f}x |" for k, v in conc.items()]
    if mtp:
        t = mtp["tok_s"]
        lines += ["", "MTP speculation (shipped graft; the engine's adaptive depth), batch 1, greedy, 3 prompts:", "",
                  "| weights | drafting | plain tok/s | tok/s | speed-up | mean accepted length |",
                  "|---|---|---|---|---|---|"]
        for key in t:
            w, _, how = key.partition(" K=")
            if not how:
                continue
            s = mtp["spec"].get(key, {})
            acc = s.get("mean_accepted_length", "")
            lines.append(f"| {w} | K={how} | {t[f'{w} plain']:.1f} | {t[key]:.1f} | "
                         f"{t[key] / t[f'{w} plain']:.2f}x | {acc if acc == '' else f'{acc:.2f}'} |")
    table = "\n".join(lines)
    print(table)
    meta = {"tokens": a.tokens, "reps": a.reps, "parts": a.parts, "prompt": PROMPT,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "perplexity_windows": n_windows,
            "window": WINDOW, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(RESULTS, exist_ok=True)
    name = "quant" if speed else "quant_" + "_".join(sorted(a.parts.split(",")))  # a later part alone
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "tok_s": speed, "rounds": rounds, "perplexity": ppl, "concurrent16": conc,
                   "mtp": mtp}, f, indent=2)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(f"# Quantized weights vs llama.cpp ({meta['date']}, {meta['cpus']} CPUs)\n\n{table}\n")


if __name__ == "__main__":
    main()
