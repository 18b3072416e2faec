"""Communicators: the only place tensors cross ranks.

Layers call ``comm.all_reduce`` / ``comm.all_gather``; which implementation runs (nothing, gloo or
NCCL via torch.distributed, or shared memory for CPU ranks on one host) is chosen once when the
worker starts, so model code is the same at every world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """Interface. Collectives are called by every rank of the group in the same order.

    ``bytes_sent`` / ``num_calls`` count what this rank contributed to collectives (the traffic
    benchmark reads them; barriers are not counted)."""

    rank: int = 0
    world_size: int = 1
    bytes_sent: int = 0
    num_calls: int = 0

    def count(self, x: torch.Tensor) -> None:
        self.bytes_sent += x.numel() * x.element_size()
        self.num_calls += 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # sum; may work in place
        raise NotImplementedError

    def all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's ``x`` along the last dim; rank r contributes ``sizes[r]``."""
        raise NotImplementedError

    def gather_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape everywhere), in rank order."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError


class NullCommunicator(Communicator):
    """One rank: every collective is the identity."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return x

    def gather_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def barrier(self) -> None:
        pass


class TorchCommunicator(Communicator):
    """torch.distributed (NCCL on CUDA, gloo on CPU) over a process group (default: all ranks)."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.src = 0 if group is None else dist.get_global_rank(group, 0)  # global rank of rank 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.count(x)
        x = x.contiguous()  # collectives need dense storage
        dist.all_reduce(x, group=self.group)
        return x

    def gather_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.count(x)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

    def all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # gloo/NCCL gather equal shapes only: pad every piece to the largest, then trim.
        width = max(sizes)
        if x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        parts = self.gather_all(x)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def barrier(self) -> None:
        dist.barrier(group=self.group)
