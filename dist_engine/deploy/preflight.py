"""Checks before a workstation launch, each with numbers: devices, a real all-reduce across the
requested ranks, shared memory, and memory for the weights and the KV cache."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_engine.weights.loader import checkpoint_files


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok    {text}")

    def bad(self, text: str) -> None:
        self.lines.append(f"  FAIL  {text}")
        self.problems.append(text)


def _allreduce_worker(rank: int, world: int, port: int, backend: str, nbytes: int, q) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    x = torch.ones(nbytes // 4, device=dev)
    for _ in range(3):
        dist.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        dist.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if rank == 0:
        q.put(((time.perf_counter() - t) / n, float(x[0]) == float(world ** (n + 3))))
    dist.destroy_process_group()


def allreduce_latency(world: int, device: str, nbytes: int = 1 << 20) -> tuple[float, bool]:
    """Seconds per all-reduce of ``nbytes`` across ``world`` local processes, and whether the
    sum was right."""
    from dist_engine.worker.shard_worker import free_port_and_ip

    port = free_port_and_ip()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    backend = "nccl" if device == "cuda" else "gloo"
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, backend, nbytes, q))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("the all-reduce processes failed; see their output above")
    return q.get()


def run_preflight(model_path: str, tp: int, device: str, kv_cache_memory: int | None,
                  memory_fraction: float, cp: int = 1) -> Report:
    """Checks for ``tp`` x ``cp`` ranks (weights split TP ways; every CP rank holds a copy)."""
    import psutil

    r = Report()
    world = tp * cp
    if device == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        (r.ok if n >= world else r.bad)(f"{n} CUDA device(s) visible, {world} needed "
                                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        for i in range(min(n, world)):
            free, total = torch.cuda.mem_get_info(i)
            r.ok(f"GPU {i}: {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    else:
        r.ok(f"CPU run: {os.cpu_count()} cores for {world} rank(s)")
    if world > 1:
        try:
            lat, right = allreduce_latency(world, device)
            r.numbers["allreduce_ms"] = lat * 1000
            (r.ok if right else r.bad)(f"all-reduce of 1 MiB across {world} ranks "
                                       f"({'nccl' if device == 'cuda' else 'gloo'}): {lat * 1000:.2f} ms"
                                       + ("" if right else ", WRONG SUM"))
        except RuntimeError as e:
            r.bad(f"all-reduce across {world} ranks failed: {e} (try --nccl-p2p-off, or set "
                  "--nccl-socket-ifname)")
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    shm_gib = shm.f_bavail * shm.f_frsize / 2**30 if shm else 0.0
    r.numbers["shm_gib"] = shm_gib
    (r.ok if shm_gib >= 1.0 or world == 1 else r.bad)(
        f"/dev/shm: {shm_gib:.1f} GiB free (NCCL and the CPU all-reduce use it; docker: --shm-size)")
    weights = sum(os.path.getsize(f) for f in checkpoint_files(model_path))
    per_rank = weights / tp
    r.numbers["weights_per_rank_gib"] = per_rank / 2**30
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= world:
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(world))
    else:
        free = psutil.virtual_memory().available / world
    kv = kv_cache_memory if kv_cache_memory is not None else (free - per_rank) * memory_fraction
    r.numbers["kv_cache_gib"] = kv / 2**30
    (r.ok if free > per_rank and kv > 0 else r.bad)(
        f"memory per rank: {free / 2**30:.1f} GiB free, weights {per_rank / 2**30:.2f} GiB "
        f"(checkpoint size / TP), KV cache about {max(0.0, kv) / 2**30:.2f} GiB")
    return r
