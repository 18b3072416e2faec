"""The hand-driven harness the Qwen3.5 tests share: our model with per-kind caches built by
hand (``LayerKV`` for attention layers, ``LayerState`` slots for Gated DeltaNet layers) and the
step metadata from ``build_batch``, as ``test_parity.py`` drives Llama."""

from __future__ import annotations

import pytest
import torch

from dist_engine import SamplingParams
from dist_engine.config import ModelConfig
from dist_engine.distributed.comm import Communicator, NullCommunicator
from dist_engine.kv_cache.kinds import PagedKV
from dist_engine.layers.kv_cache import LayerKV
from dist_engine.layers.linear import pack_weights
from dist_engine.layers.state_cache import LayerState
from dist_engine.models import model_class
from dist_engine.weights.loader import load_weights
from dist_engine.worker.batch import build_batch
from dist_engine.worker.messages import SeqWork

ATOL = 1e-4  # logits against transformers (fp32 accumulation order only)
BLOCK = 4
BLOCKS_PER_SEQ = 100
PROMPT = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(1)).tolist()
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is fastest (two spin against each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_ours(path: str, comm: Communicator | None = None):
    cfg = ModelConfig.from_pretrained(path)
    model = model_class(cfg.architecture)(cfg, comm or NullCommunicator(), torch.float32, 1024)
    load_weights(model, path, select=lambda n: not n.startswith(cfg.mtp_prefixes))
    pack_weights(model)  # as the runner does: CPU products through the row-independent kernel
    return model.eval()


def caches_for(layers, num_blocks: int, slots: int) -> list:
    """Storage of each layer's cache kind: paged K/V rows, or state slots."""
    out = []
    for layer in layers:
        kind = layer.cache_kind
        if isinstance(kind, PagedKV):
            shape = (num_blocks * BLOCK, kind.local_num_kv_heads, kind.head_dim)
            out.append(LayerKV(torch.zeros(shape), torch.zeros(shape)))
        else:
            out.append(LayerState.empty(kind, slots, CPU))
    return out


def table(seq: int) -> tuple[int, ...]:
    return tuple(range(1 + seq * BLOCKS_PER_SEQ, 1 + (seq + 1) * BLOCKS_PER_SEQ))


class Harness:
    """Our model driven step by step: sequence i keeps blocks ``table(i)`` and state slot i."""

    def __init__(self, model, slots: int = 4) -> None:
        self.model = model
        self.caches = caches_for(model.model.layers, slots * BLOCKS_PER_SEQ + 1, slots)
        attn = next(layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn"))
        self.heads_per_kv = attn.local_num_heads // attn.local_num_kv_heads

    def work(self, seq: int, tokens: list[int], start: int, drafts: int = 0, slot: int | None = None
             ) -> SeqWork:
        return SeqWork(seq, tuple(tokens), start, table(seq), True, num_drafts=drafts,
                       state_slot=seq if slot is None else slot)

    def step(self, works: list[SeqWork]):
        """(logits of every fed token ``[T, vocab]``, the step's batch)."""
        # paged: decode and verification through the C kernel over block tables, as the runner
        b = build_batch(tuple(works), BLOCK, [None], self.heads_per_kv, torch.float32, CPU, paged=True)
        with torch.inference_mode():
            return self.model.compute_logits(self.model(b.ids, b.positions, self.caches, b.meta)), b

    def feed(self, tokens: list[int], chunks: list[int], seq: int = 0, start: int = 0,
             slot: int | None = None) -> torch.Tensor:
        out = []
        for n in chunks:
            out.append(self.step([self.work(seq, tokens[start:start + n], start, slot=slot)])[0])
            start += n
        return torch.cat(out)

    def states(self, slot: int) -> list[dict[str, torch.Tensor]]:
        return [{k: t[slot].clone() for k, t in c.tensors.items()} for c in self.caches
                if isinstance(c, LayerState)]


# Through the engine: per-kind caches, state slots and checkpoints (worker/caches.py)
ENGINE = dict(skip_tokenizer_init=True, max_model_len=512, kv_cache_memory="8MiB", cpu_threads=1,
              state_checkpoint_interval=64)  # the shortest: a hit resumes from a saved state
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=32, ignore_eos=True)


def engine_prompts() -> list[list[int]]:
    """Lengths off and on the 64-token grid; the last extends the first mid-prompt."""
    g = torch.Generator().manual_seed(5)
    rest = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (7, 64, 200)]
    return [PROMPT[:150], *rest, PROMPT[:100] + rest[0]]


def generate(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
