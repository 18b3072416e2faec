"""One rank's model: weights shard, KV cache tensors, forward pass and sampling."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from dist_engine.config import EngineConfig
from dist_engine.distributed.comm import Communicator
from dist_engine.experts.cache import ExpertCache
from dist_engine.kernels.decoder import attach as attach_cpu_decoder
from dist_engine.kernels.paged_attention import available as paged_kernel_available
from dist_engine.kv_cache.kinds import (
    CacheLayout,
    PagedKV,
    RecurrentState,
    SharedKV,
    group_window,
    paged_groups,
)
from dist_engine.layers.kv_cache import storage_dtype
from dist_engine.layers.linear import pack_weights, weight_bytes
from dist_engine.layers.turboquant import PRESETS as TQ_PRESETS
from dist_engine.models import model_class
from dist_engine.quant import linear as quant_linear
from dist_engine.weights.loader import load_weights
from dist_engine.worker import cuda_graph
from dist_engine.worker.batch import ForwardBatch, build_batch, hidden_rows
from dist_engine.worker.caches import (
    LayerCache,
    layer_kinds,
    restore_states,
    settle_states,
)
from dist_engine.worker.grammar import Grammars
from dist_engine.worker.layer_taps import LayerTaps
from dist_engine.worker.messages import SampledTokens, StepInput, StepOutput
from dist_engine.worker.prompt_logprobs import prompt_logprob_rows
from dist_engine.worker.runner_cache import RunnerCaches
from dist_engine.worker.sampler import sample
from dist_engine.worker.speculative import make_decoder

# CP ranks split a step's tokens (each computes the ones it stores) from this many tokens on;
# fewer (decode) are computed on every rank, which saves the query and hidden-state exchange.
SPLIT_MIN_TOKENS = 32

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner(RunnerCaches):
    def __init__(self, config: EngineConfig, comm: Communicator, device: torch.device,
                 seq_comm: Communicator | None = None, dcp_comm: Communicator | None = None) -> None:
        self.config = config
        self.comm = comm  # the tensor-parallel group (the model's layers)
        # the ranks holding the other sequence shards of this rank's KV heads (CP x DCP), and
        # the DCP ranks of this TP group that share those heads (query heads gathered over it)
        self.seq_comm = seq_comm if seq_comm is not None and seq_comm.world_size > 1 else None
        self.dcp_comm = dcp_comm if dcp_comm is not None and dcp_comm.world_size > 1 else None
        self.device = device
        self.dtype = TORCH_DTYPES[config.dtype]
        self.kv_dtype = storage_dtype(config.cache.kv_cache_dtype, self.dtype)
        self.kv_scales: list[tuple[float, float]] | None = None  # FP8: per layer, calibrated once
        # TurboQuant codes (layers/tq_cache.py): the preset, and per layer the calibrated mean key
        self.tq_preset = config.cache.kv_cache_dtype if config.cache.kv_cache_dtype in TQ_PRESETS else None
        self.kv_means: list[torch.Tensor | None] | None = None
        self.block_size = config.cache.block_size
        torch.manual_seed(config.seed)
        mcfg = config.model
        t0 = time.perf_counter()
        # routed experts paged under a budget instead of loaded (the MoE layers register here)
        self.expert_cache = ExpertCache(config.experts, device) if config.experts is not None else None
        with torch.device(device):
            self.model = model_class(mcfg.architecture)(
                mcfg, comm, self.dtype, config.scheduler.max_model_len, self.expert_cache
            )
        # MTP layers shipped in the checkpoint (model.layers.{num_hidden_layers + j}, or mtp.*)
        # belong to the speculative decoder
        mtp_layers = mcfg.mtp_prefixes
        load_weights(self.model, mcfg.path, select=lambda n: not n.startswith(mtp_layers))
        self.model.eval()
        quant_linear.prepare(self.model, config.quantization, config.int8_activations,
                             (("speculation",) if config.speculative is not None else ())
                             + (("prefix caching",) if config.cache.enable_prefix_caching else ()))
        pack_weights(self.model)
        self.grammars = Grammars(mcfg.path, mcfg.vocab_size)  # structured output's matchers
        attach_cpu_decoder(self.model)
        # decoder layers whose outputs come back with the hidden states a request asks for
        self.taps = LayerTaps(self.model, config.hidden_state_layers) if config.hidden_state_layers else None
        # speculation: the decoder of the configured method (worker/speculative.py)
        self.drafter = make_decoder(self, config) if config.speculative is not None else None
        if self.expert_cache is not None:
            self.expert_cache.start(mcfg.path, self.model.packed_modules,
                                    getattr(self.model, "expert_checkpoint_name",
                                            getattr(self.model, "checkpoint_name", None)),
                                    config.quantization, config.int8_activations)
        self.load_seconds = time.perf_counter() - t0
        # what each layer keeps between steps (a drafter layer's own cache last): its kinds, and
        # all of them in layer order
        window = mcfg.sliding_window
        layers = list(self.model.model.layers) + (self.drafter.cache_layers() if self.drafter else [])
        self.layer_kinds = [layer_kinds(layer, self.kv_dtype, window, self.tq_preset) for layer in layers]
        self.kinds = [k for kinds in self.layer_kinds for k in kinds]
        self.has_state = any(isinstance(k, RecurrentState) for k in self.kinds)
        # compressed kinds (one row per ratio positions) get row metadata every step
        self.ratios = tuple(sorted({k.ratio for k in self.kinds if isinstance(k, PagedKV) and k.ratio > 1}))
        self.groups = tuple(paged_groups(self.kinds))  # paged groups, primary first
        self.windows = [group_window(g) for g in self.groups]
        attn = next(layer.self_attn for layer in layers if hasattr(layer, "self_attn"))
        self.local_num_kv_heads, self.head_dim = attn.local_num_kv_heads, attn.head_dim
        self.latent_cache = getattr(attn, "latent_cache", False)  # MLA: one tensor, no separate V
        # this rank's first global KV head (TurboQuant rotations are per global head)
        self.kv_head_start = attn.part.kv_start if hasattr(attn, "part") else 0
        # query heads per KV head that attention folds together (the whole DCP group's), and
        # whether it folds them, per paged group (primary first)
        # (the drafter layers that attend through the runner's metadata count; DFlash's do not)
        attending = list(self.model.model.layers) + (self.drafter.metadata_layers() if self.drafter else [])
        self.group_heads = group_heads(attending, self.layer_kinds, self.groups,
                                       self.dcp_comm.world_size if self.dcp_comm else 1)
        self.heads_per_kv = self.group_heads[0][0] if self.groups else 1
        # decode / verification attention through the C kernel over block tables (CPU, one
        # sequence shard, a full-precision, FP8 (rows of 8k values) or TurboQuant cache of
        # separate K and V); a switch for A/B checks
        fp8 = self.kv_dtype == torch.float8_e4m3fn and self.head_dim % 8 == 0
        self.use_paged_kernel = (device.type == "cpu"
                                 and (self.kv_dtype == self.dtype or self.tq_preset is not None or fp8)
                                 and not self.latent_cache and self.seq_comm is None
                                 and self.dcp_comm is None and paged_kernel_available(self.dtype))
        self.kv_caches: list[LayerCache] = []  # one per layer of the main model
        self.layout: CacheLayout | None = None
        # decode steps replayed as CUDA graphs; on CPU the same static-shape path only when a
        # test asks for it (cuda_graph.STATIC_DECODE_ON_CPU)
        self.graphs = None
        cuda = device.type == "cuda" and not config.enforce_eager
        if (cuda or cuda_graph.STATIC_DECODE_ON_CPU) and cuda_graph.DecodeGraphs.supported(self):
            self.graphs = cuda_graph.DecodeGraphs(self, capture=cuda)
        self.num_split_steps = 0  # steps whose tokens were split over CP ranks
        self.num_tail_steps = 0  # steps whose last layers ran only the sampled rows
        self.calibrating = False  # the FP8 scale pass: every rank runs every token
        self.memory_report: dict[str, int] = {}  # activation peak and KV budget, once measured

    def build(self, seqs, windows: list[int | None] | None = None) -> ForwardBatch:
        """Flat tensors and attention metadata for ``seqs`` on this rank (its KV shard);
        ``windows``: each paged group's window if not its own (a drafter reading more keys)."""
        sc = self.seq_comm
        (heads, fold), *others = self.group_heads or [(1, False)]
        batch = build_batch(tuple(seqs), self.block_size, windows or self.windows,
                            heads, self.dtype, self.device, groups=self.groups,
                            shard=sc.rank if sc else 0, num_shards=sc.world_size if sc else 1, cp=sc,
                            dcp=self.dcp_comm, fold=fold, paged=self.use_paged_kernel,
                            group_heads=tuple(others), ratios=self.ratios)
        if self._sampled_rows_suffice(seqs, batch):
            tail = tuple(dataclasses.replace(s, token_ids=s.token_ids[-n:], start_pos=s.context_len - n)
                         for s in seqs if s.sample for n in (1 + s.num_drafts,))
            batch.meta.tail_rows = batch.sample_index
            batch.meta.tail = self.build(tail).meta if tail else None
            self.num_tail_steps += 1
        return batch

    def _sampled_rows_suffice(self, seqs, batch: ForwardBatch) -> bool:
        """Whether the model's layers from ``tail_start`` on (they store no K/V) may run only the
        sampled rows: nobody reads the others' hidden states (no speculation, no hidden states or
        prompt logprobs asked for, no sequence shards) and some row is not sampled."""
        return (getattr(self.model, "tail_start", None) is not None and self.drafter is None
                and self.seq_comm is None and self.dcp_comm is None and not self.calibrating
                and not any(s.return_hidden or s.prompt_logprobs is not None for s in seqs)
                and len(batch.sample_index) < batch.meta.num_tokens)

    def modules(self) -> list[torch.nn.Module]:
        """Every module this rank runs: the model, and with speculation the MTP layer and the
        draft head."""
        return [self.model] + (self.drafter.modules() if self.drafter is not None else [])

    def weight_bytes(self) -> int:
        return sum(weight_bytes(r) for r in self.modules())

    def weight_formats(self) -> dict[str, int]:
        """Bytes of weights per format (dtype, or quantization format) on this rank."""
        return quant_linear.format_bytes(self.modules())

    # ---- one engine step ---------------------------------------------------------------------
    def _forward(self, batch: ForwardBatch, raw: bool = False):
        """Hidden states of every token of the step ``[T, hidden]`` (and pre-norm ones if
        ``raw``). Long steps under CP: each rank runs only the tokens it stores through the
        layers, then the rows are summed over the CP group (each row has one non-zero owner,
        so every rank gets the owner's exact bits)."""
        split = _split_meta(self, batch)
        if split is None:
            if self.expert_cache is not None:
                self.expert_cache.begin_forward(batch.ids)
            return self.model(batch.ids, batch.positions, self.kv_caches, batch.meta, raw)
        own = split.split_own
        self.num_split_steps += 1
        if self.expert_cache is not None:
            self.expert_cache.begin_forward(batch.ids[own])
        out = self.model(batch.ids[own], batch.positions[own], self.kv_caches, split, raw)
        full = []
        for x in (out if raw else (out,)):  # [W, hidden] -> [T, hidden]
            rows = x.new_zeros(batch.meta.num_tokens, x.shape[-1])
            rows[own] = x
            full.append(self.seq_comm.all_reduce(rows))
        return tuple(full) if raw else full[0]

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        t0 = time.perf_counter()
        self.grammars.release(step.released)
        if self.has_state:
            restore_states(self.kv_caches, self.layout, step.seqs)
        prompt_lps = any(s.prompt_logprobs is not None for s in step.seqs)
        hidden = (self.graphs.forward(step.seqs) if self.graphs is not None and not prompt_lps
                  else None)  # [T, hidden]
        if hidden is not None and self.drafter is None:
            return self._sample(step, step.seqs, hidden, {})
        batch = self.build(step.seqs)
        if prompt_lps:
            return self._with_prompt_logprobs(step, batch)
        if hidden is not None:  # a verification step through the static path
            self.drafter.seconds["main_forward"] += time.perf_counter() - t0
            return self.drafter.step(step, batch, hidden, None)
        if self.drafter is not None:
            raw = self.config.speculative.hidden_stage == "raw"
            t0 = time.perf_counter()
            out = self._forward(batch, raw)
            hidden, prenorm = out if raw else (out, None)  # [T, hidden] each
            self.drafter.seconds["main_forward"] += time.perf_counter() - t0
            return self.drafter.step(step, batch, hidden, prenorm)
        hidden = self._forward(batch)  # [T, hidden]
        rows = hidden_rows(step, batch, hidden, {}, self.taps)
        if not batch.sample_seqs:
            self.settle_states(step, batch, {})
            return StepOutput(step.step_id, {}, rows)
        out = self._sample(step, batch.sample_seqs, hidden[batch.sample_index], rows)
        self.settle_states(step, batch, out.sampled)
        return out

    def settle_states(self, step: StepInput, batch: ForwardBatch, sampled: dict[int, SampledTokens]) -> None:
        """Recurrent layers: each sequence's state after the tokens this step verified (fed
        tokens less rejected drafts), and the checkpoints it reached saved."""
        if not self.has_state:
            return
        verified = [len(s.token_ids) - s.num_drafts
                    + (sampled[s.seq_id].num_accepted if s.seq_id in sampled else 0) for s in step.seqs]
        settle_states(self.kv_caches, self.layout, step.seqs, batch.meta.state, verified)

    def _with_prompt_logprobs(self, step: StepInput, batch: ForwardBatch) -> StepOutput:
        """A step with prompt logprobs: the usual step, then the rows' logprobs from the same
        hidden states (a prefill step carries no drafts, so no row is rejected later)."""
        if self.drafter is not None:
            raw = self.config.speculative.hidden_stage == "raw"
            out = self._forward(batch, raw)
            hidden, prenorm = out if raw else (out, None)  # [T, hidden] each
            result = self.drafter.step(step, batch, hidden, prenorm)
        else:
            hidden = self._forward(batch)  # [T, hidden]
            rows = hidden_rows(step, batch, hidden, {}, self.taps)
            result = (self._sample(step, batch.sample_seqs, hidden[batch.sample_index], rows)
                      if batch.sample_seqs else StepOutput(step.step_id, {}, rows))
            self.settle_states(step, batch, result.sampled)
        result.prompt_logprobs.update(prompt_logprob_rows(step, batch, hidden, self.model))
        return result

    def _sample(self, step: StepInput, seqs, hidden: torch.Tensor, rows: dict) -> StepOutput:
        """One token for each of ``seqs`` from its hidden state (``hidden`` ``[N, hidden]``)."""
        logits = self.model.compute_logits(hidden)  # [N, vocab] fp32
        positions = [s.context_len for s in seqs]  # position of the drawn token
        specs = [self.grammars.constrain(s.seq_id, s.sampling) for s in seqs]
        tokens, lps, top = sample(logits, specs, positions)
        for s, t in zip(seqs, tokens):
            self.grammars.advance(s.seq_id, (t,))
        return StepOutput(step.step_id, {
            s.seq_id: SampledTokens((t,), (lp,), (tp,) if tp else ())
            for s, t, lp, tp in zip(seqs, tokens, lps, top)
        }, rows)


def group_heads(layers, layer_kinds, groups: tuple[str, ...], dcp: int) -> list[tuple[int, bool]]:
    """Per paged group: (query heads per KV head attended together, whether short query groups
    fold them into the mask). A group whose layers have different ratios, or one KV head per
    rank (MLA, DCP, replicated KV heads), does not fold: one mask serves every head."""
    out = []
    for g in groups:
        attns = [layer.self_attn for layer, kinds in zip(layers, layer_kinds) for k in kinds
                 if isinstance(k, (PagedKV, SharedKV)) and k.group == g and hasattr(layer, "self_attn")]
        ratios = {a.local_num_heads // a.local_num_kv_heads for a in attns}
        fold = len(ratios) == 1 and all(a.local_num_kv_heads > 1 for a in attns)
        out.append((ratios.pop() * dcp if len(ratios) == 1 else 1, fold))
    return out


def _split_meta(runner: ModelRunner, batch: ForwardBatch):
    """Metadata for splitting this step's tokens over the CP ranks, or None to compute every
    token on every rank (short steps, DCP, a shard that would get no token, or recurrent
    layers: their state runs through every token in order, on every rank)."""
    sc = runner.seq_comm
    if (sc is None or runner.dcp_comm is not None or runner.calibrating or runner.has_state
            or batch.meta.num_tokens < SPLIT_MIN_TOKENS
            or min(len(ix) for ix in batch.shard_tokens) == 0):
        return None
    split = dict(write_index=None, split_tokens=batch.shard_tokens, split_own=batch.shard_tokens[sc.rank])
    meta = dataclasses.replace(batch.meta, **split)
    # every paged group stripes logical block i onto shard i mod CP, so a token's owner is the
    # same in each group and one split serves them all
    meta.by_group = {g: dataclasses.replace(m, **split) for g, m in batch.meta.by_group.items()}
    return meta


def default_threads(local_ranks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks))
