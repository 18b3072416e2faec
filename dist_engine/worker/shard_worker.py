"""ShardWorker: one rank. The same class runs in-process or as a Ray actor."""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import replace

import torch
import torch.distributed as dist

from dist_engine.config import EngineConfig
from dist_engine.distributed.comm import Communicator, NullCommunicator, TorchCommunicator
from dist_engine.kv_cache.kinds import CacheLayout, bytes_by_role
from dist_engine.worker.messages import StepInput, StepOutput
from dist_engine.worker.model_runner import ModelRunner, default_threads

log = logging.getLogger(__name__)


def free_port_and_ip() -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    try:
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        ip = "127.0.0.1"
    return ip, port


class ShardWorker:
    def __init__(self, config: EngineConfig, rank: int, local_ranks: int) -> None:
        self.config = config
        self.rank = rank
        self.local_ranks = local_ranks
        self.runner: ModelRunner | None = None
        if config.device == "cpu":
            torch.set_num_threads(config.cpu_threads or default_threads(local_ranks))

    def address(self) -> tuple[str, int]:
        """An address rank 0 can host the torch.distributed rendezvous on."""
        return free_port_and_ip()

    def init_distributed(self, master: tuple[str, int] | None) -> None:
        """Join the world, then build three communicators: TP (the model's layers), DCP (the
        ranks of a TP group that share KV heads, gathering query heads) and the sequence-shard
        group (CP x DCP ranks whose attention partials are merged). rank = cp_rank * TP + tp_rank;
        shard = cp_rank * DCP + dcp_rank."""
        par = self.config.parallel
        world, tp, cp = par.world_size, par.tensor_parallel_size, par.context_parallel_size
        dcp = par.decode_context_parallel_size
        self.comm: Communicator = NullCommunicator()
        self.dcp_comm: Communicator = NullCommunicator()
        self.seq_comm: Communicator = NullCommunicator()
        if world == 1:
            return
        backend = "nccl" if self.config.device == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
            world_size=world, timeout=datetime.timedelta(seconds=par.collective_timeout_s),
        )
        cp_rank, tp_rank = divmod(self.rank, tp)
        g, dcp_rank = divmod(tp_rank, dcp)
        # every rank creates every group, in the same order
        tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)] if cp > 1 else None
        dcp_groups = ([[dist.new_group([c * tp + h * dcp + j for j in range(dcp)]) for h in range(tp // dcp)]
                       for c in range(cp)] if dcp > 1 and tp > dcp else None)
        seq_groups = ([dist.new_group([c * tp + h * dcp + j for c in range(cp) for j in range(dcp)])
                       for h in range(tp // dcp)] if cp > 1 and cp * dcp < world else None)
        if tp > 1:
            self.comm = self._wrap(TorchCommunicator(tp_groups[cp_rank] if tp_groups else None), master)
        if dcp > 1:
            self.dcp_comm = (self.comm if dcp_groups is None
                             else self._wrap(TorchCommunicator(dcp_groups[cp_rank][g]), master))
        if cp * dcp > 1:
            if cp == 1:
                self.seq_comm = self.dcp_comm
            elif seq_groups is None:  # the sequence shards are the whole world
                self.seq_comm = self._wrap(TorchCommunicator(), master)
            else:
                self.seq_comm = self._wrap(TorchCommunicator(seq_groups[g]), master)

    def _wrap(self, comm: TorchCommunicator, master) -> Communicator:
        if self.config.device == "cpu" and self.config.parallel.shm_allreduce:
            from dist_engine.distributed.shm import ShmCommunicator

            return ShmCommunicator.create(comm, master)
        return comm

    def load_model(self) -> float:
        if self.config.device == "cuda":
            device = torch.device("cuda", 0)  # Ray exposes each actor's GPU as device 0
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.runner = ModelRunner(self.config, self.comm, device, self.seq_comm, self.dcp_comm)
        return self.runner.load_seconds

    def cache_layout(self) -> CacheLayout:
        return self.runner.cache_layout(self.local_ranks)

    def cache_info(self) -> dict:
        r = self.runner
        formats = {f"weight_bytes[{k}]": v for k, v in r.weight_formats().items()}
        info = {"bytes_per_block": r.kv_bytes_per_block(), "state_bytes_per_seq": r.state_bytes_per_seq(),
                "bytes_per_block_by_group": r.bytes_per_block(), "bytes_by_role": bytes_by_role(r.kinds),
                "allocated_bytes": r.allocated_bytes(), "weight_bytes": r.weight_bytes(), **formats,
                **r.memory_report}
        if r.expert_cache is not None:
            s = r.expert_cache.stats()
            info.update(expert_cache_budget_bytes=s.budget_bytes, expert_cache_slots=s.num_slots,
                        expert_bytes=s.expert_bytes)
        return info

    def init_cache(self, layout: CacheLayout) -> None:
        self.runner.init_cache(layout)

    def execute(self, step: StepInput) -> StepOutput:
        out = self.runner.execute(step)
        if out.hidden and self.rank != 0:  # every rank has them; the driver reads rank 0's
            out = replace(out, hidden={})
        if self.runner.expert_cache is not None:
            out = replace(out, experts=self.runner.expert_cache.stats())
        return out

    def comm_stats(self) -> dict[str, dict[str, int]]:
        """Bytes this rank has sent into collectives so far, per group; one communicator serving
        several roles (e.g. TP=DCP=2: the TP group is also the DCP and shard group) is reported
        once under the joined names, e.g. ``tp+dcp+seq``."""
        roles: dict[int, tuple[Communicator, list[str]]] = {}
        for attr, role in (("comm", "tp"), ("dcp_comm", "dcp"), ("seq_comm", "seq")):
            c = getattr(self, attr, None)
            if c is not None and c.world_size > 1:
                roles.setdefault(id(c), (c, []))[1].append(role)
        return {"+".join(names): {"bytes": c.bytes_sent, "calls": c.num_calls}
                for c, names in roles.values()}

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if self.runner is not None and self.runner.expert_cache is not None:
            self.runner.expert_cache.close()
        if dist.is_initialized():
            dist.destroy_process_group()
