"""Shared-memory collectives for CPU ranks on one host.

gloo costs ~1 ms per call on loopback whatever the size, which at two all-reduces per layer
dominates a CPU decode step. Ranks on one host instead share one mapped file in /dev/shm:

    [flags: world x int64][buffer 0: world x slot][buffer 1: world x slot]

Call number g writes this rank's tensor into its slot of buffer g % 2, publishes g in its flag,
spins until every flag reaches g, and reads all slots. Every rank sums slots in rank order, so
results are bit-identical across ranks. Two buffers make reuse safe: a rank can only start
writing buffer g % 2 again at call g + 2 after all ranks have published g + 1, i.e. finished
reading call g. x86 keeps stores in order, so a published flag implies the data before it.
Tensors too large for a slot fall back to the wrapped torch.distributed communicator.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

from dist_engine.distributed.comm import Communicator, TorchCommunicator

SLOT_BYTES = 4 << 20  # per rank per buffer: [T, hidden] fp32 activations up to 1M floats
_SPINS_BEFORE_YIELD = 2000


class ShmCommunicator(Communicator):
    def __init__(self, fallback: TorchCommunicator, path: str, create: bool) -> None:
        self.rank, self.world_size = fallback.rank, fallback.world_size
        self.fallback = fallback
        nbytes = 8 * self.world_size + 2 * self.world_size * SLOT_BYTES
        if create:
            with open(path, "wb") as f:
                f.truncate(nbytes)
        raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._raw = raw
        self.flags = raw[: 8 * self.world_size].view(torch.int64)  # [world]
        self._flags_np = self.flags.numpy()
        self.buffers = raw[8 * self.world_size:].view(2, self.world_size, SLOT_BYTES)
        self.calls = 0

    @classmethod
    def create(cls, fallback: TorchCommunicator, master: tuple[str, int]) -> Communicator:
        """Collective: every rank calls it. Falls back to ``fallback`` across hosts."""
        g = fallback.group
        hosts: list[str | None] = [None] * fallback.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=g)
        if len(set(hosts)) != 1 or not os.path.isdir("/dev/shm"):
            return fallback
        # Rank 0 creates the file before announcing its name, so no rank maps it half-made.
        comm = None
        name: list[str | None] = [None]
        if fallback.rank == 0:
            name = [f"/dev/shm/dist_engine_{uuid.uuid4().hex}"]
            comm = cls(fallback, name[0], create=True)
        dist.broadcast_object_list(name, src=fallback.src, group=g)
        if comm is None:
            comm = cls(fallback, name[0], create=False)
        dist.barrier(group=g)
        if fallback.rank == 0:
            os.unlink(name[0])  # stays mapped in every rank; nothing left behind on exit
        dist.barrier(group=g)
        return comm

    def _exchange(self, x: torch.Tensor) -> torch.Tensor | None:
        """Publish ``x`` and return a ``[world, numel]`` view of every rank's copy (or None)."""
        nbytes = x.numel() * x.element_size()
        if nbytes > SLOT_BYTES:
            return None
        self.calls += 1
        g, buf = self.calls, self.buffers[self.calls % 2]
        buf[self.rank, :nbytes].copy_(x.contiguous().view(-1).view(torch.uint8))
        self._flags_np[self.rank] = g
        flags, spins = self._flags_np, 0
        while flags.min() < g:
            spins += 1
            if spins % _SPINS_BEFORE_YIELD == 0:
                time.sleep(0)  # more ranks than cores: let the others run
        return buf[:, :nbytes].view(x.dtype).view(self.world_size, -1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.count(x)
        parts = self._exchange(x)
        if parts is None:
            return self.fallback.all_reduce(x)
        acc = parts[0].float() if x.dtype != torch.float32 else parts[0].clone()
        for r in range(1, self.world_size):  # fixed order: identical bits on every rank
            acc += parts[r]
        return acc.to(x.dtype).view(x.shape)

    def all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        self.count(x)
        parts = self._exchange(x)
        if parts is None:
            return self.fallback.all_gather(x[..., : sizes[self.rank]], sizes)
        pieces = [parts[r].view(x.shape)[..., :n] for r, n in enumerate(sizes)]
        return torch.cat(pieces, dim=-1)

    def gather_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.count(x)
        parts = self._exchange(x)
        if parts is None:
            return self.fallback.gather_all(x)
        return [parts[r].view(x.shape).clone() for r in range(self.world_size)]  # slots get reused

    def barrier(self) -> None:
        self._exchange(torch.zeros(1))
