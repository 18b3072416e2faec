"""Where a batch-1 decode step's time goes on the GPU (bf16 random weights of the default model's
shape): torch.profiler's operator table and cProfile's Python table over 16 decode steps.

    python bench/gpu_profile.py [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import SHAPES, make_shape, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    from dist_engine import LLM, SamplingParams

    dev, out = a.device, []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_shape(tmp, "s", SHAPES["smollm2-135m-shape"], dev, mtp=False)
        llm = LLM(path, device=dev, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
                  enforce_eager=a.eager, speculative="none")
        prompt = [[1] + list(range(3, 34))]

        def gen(n):
            sync(dev)
            t = time.perf_counter()
            llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(
                temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            sync(dev)
            return time.perf_counter() - t

        gen(8)
        t64, t1 = gen(65), gen(1)
        graphs = llm.engine.executor.worker.runner.graphs
        out.append(f"decode step: {(t64 - t1) / 64 * 1000:.2f} ms (prefill+1: {t1 * 1000:.1f} ms); "
                   f"graph steps {graphs.num_steps if graphs else 0}")
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            gen(17)
        out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        if dev == "cuda":
            out.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
        pr = cProfile.Profile()
        pr.enable()
        gen(17)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(45)
        out.append(s.getvalue())
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        out.append(s.getvalue())
        llm.shutdown()
    text = "\n\n".join(out)
    print(text[:3000])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"gpu_profile{'_eager' if a.eager else ''}.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
