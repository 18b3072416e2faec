"""ShardWorker: one rank. The same class runs in-process or as a Ray actor."""

from __future__ import annotations

import datetime
import logging
import socket

import torch
import torch.distributed as dist

from dist_engine.config import EngineConfig
from dist_engine.distributed.comm import Communicator, NullCommunicator, TorchCommunicator
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
        world = self.config.parallel.world_size
        if world == 1:
            comm: Communicator = NullCommunicator()
        else:
            backend = "nccl" if self.config.device == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=self.config.parallel.collective_timeout_s),
            )
            comm = TorchCommunicator()
            if self.config.device == "cpu" and self.config.parallel.shm_allreduce:
                from dist_engine.distributed.shm import ShmCommunicator

                comm = ShmCommunicator.create(comm, master)
        self.comm = comm

    def load_model(self) -> float:
        if self.config.device == "cuda":
            device = torch.device("cuda", 0)  # Ray exposes each actor's GPU as device 0
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.runner = ModelRunner(self.config, self.comm, device)
        return self.runner.load_seconds

    def available_kv_blocks(self) -> int:
        return self.runner.available_kv_blocks(self.local_ranks)

    def cache_info(self) -> dict[str, int]:
        return {"bytes_per_block": self.runner.kv_bytes_per_block(),
                "weight_bytes": self.runner.weight_bytes(), **self.runner.memory_report}

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_cache(num_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
