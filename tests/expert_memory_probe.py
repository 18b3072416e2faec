"""Run in a subprocess by test_expert_cache.py and bench/bench_expert_cache.py: load a model
(experts paged or all resident), generate, and print one JSON line with this process's resident
memory (RssAnon / RssFile sampled every 2 ms while generating, and after loading; the resident
part of any mapping of the checkpoint files) and how much
of the routed experts' bytes the page cache holds afterwards (``mincore``).

    python expert_memory_probe.py MODEL [--budget SIZE] [--tokens N] [--prompts N] [--prompt-len N]
        [--policy lfu|lru] [--no-prefetch] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def page_cached_bytes(file: str, ranges: list[tuple[int, int]]) -> int:
    """Bytes of ``ranges`` ((offset, length) in ``file``) that the page cache holds now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size, page = os.path.getsize(file), mmap.PAGESIZE
    fd = os.open(file, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(ctypes.c_void_p(addr), size, pages) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    cached = 0
    for off, n in ranges:
        cached += sum(page for p in range(off // page, (off + n - 1) // page + 1) if pages[p] & 1)
    return cached


def mapped_checkpoint_bytes() -> int:
    """Resident bytes of this process's mappings of ``*.safetensors`` files (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: range perms ... path
                inside = line.rstrip().endswith(".safetensors")
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def expert_ranges(path: str) -> dict[str, list[tuple[int, int]]]:
    """file -> (offset, length) of every routed expert tensor of the checkpoint at ``path``."""
    from dist_engine.experts.source import read_header
    from dist_engine.weights.loader import checkpoint_files

    out = {}
    for file in checkpoint_files(path):
        header, base = read_header(file)
        out[file] = [(base + m["data_offsets"][0], m["data_offsets"][1] - m["data_offsets"][0])
                     for name, m in header.items() if ".mlp.experts." in name]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", default=None)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--policy", default="lfu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None, help="int8 | int4: quantize the float weights at load")
    a = ap.parse_args()

    from dist_engine import LLM, SamplingParams
    from dist_engine.experts.stats import process_rss

    kw = dict(skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=64,
              dtype=a.dtype, quantization=a.quantization)
    if a.budget:
        kw.update(expert_cache_memory=a.budget, expert_prefetch=not a.no_prefetch, expert_cache_policy=a.policy)
    t0 = time.perf_counter()
    llm = LLM(a.model, **kw)
    load_s = time.perf_counter() - t0
    after_load = process_rss()
    peak = [*after_load, mapped_checkpoint_bytes()]
    done = threading.Event()

    def watch() -> None:
        tick = 0
        while not done.is_set():
            anon, file = process_rss()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], file)
            if tick % 10 == 0:  # smaps is slower to read
                peak[2] = max(peak[2], mapped_checkpoint_bytes())
            tick += 1
            done.wait(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    prompts = [[1] + [(7 * i + 13 * j) % 300 + 3 for j in range(a.prompt_len)] for i in range(a.prompts)]
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=a.tokens, ignore_eos=True))
    gen_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    stats = llm.engine.stats()["expert_cache"]
    llm.shutdown()
    ranges = expert_ranges(a.model)
    ttft = max(o.metrics.time_to_first_token for o in outs)
    print(json.dumps({
        "load_s": load_s, "generate_s": gen_s, "ttft_s": ttft,
        "decode_tok_s": a.prompts * (a.tokens - 1) / (gen_s - ttft), "tokens": [o.outputs[0].token_ids for o in outs],
        "rss_anon_after_load": after_load[0], "rss_file_after_load": after_load[1],
        "peak_rss_anon": peak[0], "peak_rss_file": peak[1], "peak_checkpoint_mapped": peak[2],
        "expert_bytes_on_disk": sum(n for r in ranges.values() for _, n in r),
        "expert_bytes_page_cached": sum(page_cached_bytes(f, r) for f, r in ranges.items()),
        "expert_cache": stats}))


if __name__ == "__main__":
    main()
