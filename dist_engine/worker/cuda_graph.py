"""CUDA graphs for decode steps.

On a GPU a small model's decode step is bound by kernel launches, not by the GPU: each layer
issues dozens of small kernels and Python issues them one by one (~27 ms of CPU time for 2.6 ms
of kernels on the default model, H200). A CUDA graph records the forward once per shape and
replays it with one launch.

A speculative step's verification is a decode step too: each of its K + 1 tokens per sequence
is a row of its own (position, cache slot, and keys up to itself), and every layer stores all
rows' K/V before any row attends, so a row sees the drafts before it. Its main forward takes
the same path (final-norm hidden states only: a model whose MTP layer reads pre-norm ones stays
eager), and so does the MTP layer (``forward_mtp``): its catch-up over the verified positions
and each chained draft step are rows of the same kind over the MTP layer's own cache, with the
hidden states they read copied into a fixed buffer. Drafting's head and sampling stay eager.

Shapes are fixed per graph: the rows are padded up to a count from ``BATCH_SIZES`` and the keys
up to a power of two (at least ``MIN_KEYS``, at most ``max_model_len``), and attention reads the
key slots through block tables on the device (``StaticDecodeGroup``). Padding rows feed token 0
at position 0, attend slot 0 and write their K/V into a scratch block past the ones the block
manager owns, so they never touch a sequence's cache. Graphs are captured when a shape is first
needed (that step pays the capture, tens of milliseconds) and share one memory pool. Steps that
do not fit (prefill chunks, hidden states asked for, more rows than the largest size, TP or sequence
shards, MoE routing, MLA, more than ``MAX_GATHER_ELEMENTS`` gathered K/V elements) run eagerly,
and so does every step after a capture fails (out of memory, say).
"""

from __future__ import annotations

import logging

import torch

from dist_engine.config.engine import decode_graphs_apply
from dist_engine.layers.attention import AttentionMetadata, StaticDecodeGroup

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KEYS = 256
# A graph gathers every sequence's K and V over the whole key bucket in one piece (no key tiles)
# and keeps its peak in the pool for good: steps above this many gathered elements run eagerly.
MAX_GATHER_ELEMENTS = 1 << 26
# Run the static-shape decode path (eagerly) on CPU too: lets tests check it without a GPU.
STATIC_DECODE_ON_CPU = False

log = logging.getLogger(__name__)


class DecodeGraphs:
    """``capture=False`` runs the same static-shape forward eagerly (how CPU tests check it)."""

    def __init__(self, runner, capture: bool = True) -> None:
        self.runner = runner
        self.capture = capture
        sc, spec = runner.config.scheduler, runner.config.speculative
        bs = self.block_size = runner.block_size
        rows_per_seq = 1 + (spec.num_speculative_tokens if spec is not None else 0)
        self.max_batch = min(sc.max_num_seqs * rows_per_seq, BATCH_SIZES[-1])  # rows
        self.sizes = [b for b in BATCH_SIZES if b < self.max_batch] + [self.max_batch]
        self.max_keys = -(-sc.max_model_len // bs) * bs
        self.window = runner.windows[0]
        dev, n = runner.device, self.max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, self.max_keys // bs, dtype=torch.long, device=dev)
        self.key_pos = torch.arange(self.max_keys, device=dev)
        # the hidden states the MTP layer's rows read
        self.hidden_in = (torch.zeros(n, runner.config.model.hidden_size, dtype=runner.dtype, device=dev)
                          if runner.mtp is not None else None)
        self.scratch_slot = 0  # set by ``bind`` once the cache exists
        self.graphs: dict[tuple[str, int, int], tuple[object, torch.Tensor]] = {}  # (kind, Bp, Kp)
        self.pool = None
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.num_steps = 0  # decode steps that took this path
        self.num_mtp_runs = 0  # MTP layer runs that took it

    @staticmethod
    def supported(runner) -> bool:
        p, spec = runner.config.parallel, runner.config.speculative
        return ((spec is None or spec.hidden_stage == "normed") and not runner.has_state
                and len(runner.groups) == 1
                and decode_graphs_apply(runner.config.model, p.tensor_parallel_size,
                                 p.context_parallel_size, p.decode_context_parallel_size))

    def bind(self, num_blocks: int) -> None:
        """The cache was (re)made with ``num_blocks`` managed blocks plus one scratch block:
        recorded graphs point at the old tensors, so they are dropped."""
        self.scratch_slot = num_blocks * self.block_size
        self.graphs.clear()
        self.pool = None

    def _shape(self, seqs, main: bool = True) -> tuple[int, int] | None:
        """(padded rows, padded key count) of the graph a step replays, or None when the step
        does not fit one. ``main``: the main model, which takes decode steps only (one token per
        sequence plus the drafts it verifies); the MTP layer takes any rows that fit."""
        r = self.runner
        rows = sum(len(s.token_ids) for s in seqs)
        if (self.failed or not 0 < rows <= self.max_batch or r.calibrating
                or main and not all(len(s.token_ids) == 1 + s.num_drafts and s.sample
                                    and not s.return_hidden for s in seqs)):
            return None
        Bp = next(b for b in self.sizes if b >= rows)
        Kp = self._key_bucket(max(s.context_len for s in seqs))
        per_key = max(r.local_num_kv_heads * r.head_dim, r.local_num_kv_heads * r.heads_per_kv)  # K/V, scores
        return (Bp, Kp) if Bp * Kp * per_key <= MAX_GATHER_ELEMENTS else None

    def _key_bucket(self, keys: int) -> int:
        k = MIN_KEYS
        while k < keys:
            k *= 2
        return min(-(-k // self.block_size) * self.block_size, self.max_keys)

    def forward(self, seqs) -> torch.Tensor | None:
        """Final-norm hidden states ``[T, hidden]`` of the tokens the sequences feed (one each,
        plus any drafts to verify), in order, or None when the step does not fit a graph or
        recording one failed (the caller runs the step eagerly)."""
        shape = self._shape(seqs)
        if shape is None:
            return None
        self.num_steps += 1
        return self._replay("main", seqs, *shape)

    def forward_mtp(self, seqs, hidden: torch.Tensor) -> torch.Tensor | None:
        """The MTP layer's raw outputs ``[T, hidden]`` for the tokens of ``seqs`` (token p + 1
        at position p), reading ``hidden`` ``[T, hidden]``; None: run it eagerly."""
        shape = self._shape(seqs, main=False)
        if shape is None:
            return None
        self.num_mtp_runs += 1
        self.hidden_in[:hidden.shape[0]].copy_(hidden)
        return self._replay("mtp", seqs, *shape)

    def _replay(self, kind: str, seqs, Bp: int, Kp: int) -> torch.Tensor | None:
        """Fill the buffers with ``seqs``' rows and run (or replay) the ``kind`` graph."""
        bs = self.block_size
        nb = Kp // bs
        # one row per fed token: its position, its cache slot, keys up to and including itself
        rows = [(s, t, s.start_pos + j) for s in seqs for j, t in enumerate(s.token_ids)]
        B, pad = len(rows), Bp - len(rows)
        cols = [[t for _, t, _ in rows] + [0] * pad,
                [p for _, _, p in rows] + [0] * pad,
                [s.block_table[p // bs] * bs + p % bs for s, _, p in rows] + [self.scratch_slot] * pad,
                [p + 1 for _, _, p in rows] + [1] * pad]
        host = torch.tensor(cols, dtype=torch.long)  # [4, Bp]
        for buf, row in zip((self.ids, self.positions, self.slots, self.context_lens), host):
            buf[:Bp].copy_(row, non_blocking=True)
        tables = torch.zeros(Bp, nb, dtype=torch.long)
        b = 0
        for s in seqs:  # a sequence's rows share its table, up to its last fed position
            used = min(nb, (s.context_len - 1) // bs + 1)
            tables[b:b + len(s.token_ids), :used] = torch.tensor(s.block_table[:used], dtype=torch.long)
            b += len(s.token_ids)
        self.tables[:Bp, :nb].copy_(tables, non_blocking=True)
        if not self.capture:
            return self._run(kind, Bp, Kp)[:B]
        entry = self.graphs.get((kind, Bp, Kp))
        if entry is None:
            try:
                entry = self.graphs[(kind, Bp, Kp)] = self._record(kind, Bp, Kp)
            except RuntimeError as e:  # out of memory, say: keep serving, every step eager
                log.warning("CUDA graph capture failed (%s); decode steps run eagerly", e)
                self.failed = True
                self._forget_caches()
                return None
        entry[0].replay()
        return entry[1][:B]

    def _run(self, kind: str, Bp: int, Kp: int) -> torch.Tensor:
        """The forward from the buffers; key slots and mask are computed once for all layers."""
        r, bs = self.runner, self.block_size
        pos = self.key_pos[:Kp].view(1, Kp)
        ctx = self.context_lens[:Bp].view(Bp, 1)
        allowed = pos < ctx  # [Bp, Kp]
        if self.window is not None:
            allowed &= pos > ctx - 1 - self.window
        slots = self.tables[:Bp, :Kp // bs].index_select(1, self.key_pos[:Kp] // bs) * bs + self.key_pos[:Kp] % bs
        group = StaticDecodeGroup(slots.masked_fill(~allowed, 0), (~allowed).view(Bp, 1, 1, Kp))
        meta = AttentionMetadata(num_tokens=Bp, slot_mapping=self.slots[:Bp], groups=[group])
        if kind == "main":
            return r.model(self.ids[:Bp], self.positions[:Bp], r.kv_caches, meta)
        return r.mtp.forward_layer(self.positions[:Bp], self.ids[:Bp], self.hidden_in[:Bp], meta)

    def _record(self, kind: str, Bp: int, Kp: int):
        """Warm up once on a side stream (lazy initialisation stays out of the graph), then
        record. The warm-up writes this step's K/V, which the replay writes again (same values)."""
        self._forget_caches()
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(kind, Bp, Kp)
        torch.cuda.current_stream().wait_stream(side)
        self._forget_caches()  # what a layer caches per positions tensor must be recorded too
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(kind, Bp, Kp)
        self.pool = graph.pool()
        self._forget_caches()
        return graph, out

    def _forget_caches(self) -> None:
        for m in (m for root in self.runner.modules() for m in root.modules()):
            if getattr(m, "_cached", None) is not None:
                m._cached = None
