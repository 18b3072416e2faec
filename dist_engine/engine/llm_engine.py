"""LLMEngine: requests in, one executor round trip per step, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import operator
import random
import time
from dataclasses import replace

from dist_engine.config import EngineConfig
from dist_engine.engine.detokenizer import IncrementalDetokenizer
from dist_engine.engine.draft_depth import DraftDepth
from dist_engine.engine.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    SpecDecodeStats,
)
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.engine.scheduler import Scheduler
from dist_engine.engine.sequence import Sequence
from dist_engine.engine.startup_log import log_cache
from dist_engine.engine.state_keeper import StateKeeper
from dist_engine.engine.stopping import append_tokens
from dist_engine.engine.structured import GrammarChecker
from dist_engine.experts.stats import ExpertCacheStats
from dist_engine.kv_cache.block_manager import BlockManager
from dist_engine.kv_cache.kinds import group_window
from dist_engine.kv_cache.window_groups import WindowGroups
from dist_engine.worker.executor import make_executor
from dist_engine.worker.messages import StepInput

log = logging.getLogger(__name__)
MAX_CACHE_SALT_BYTES = 1024
EXPERT_LOG_EVERY_S = 30.0  # the expert cache's hit rate and traffic in the log at most this often


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 seqs: list[Sequence]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_ids
        self.seqs = seqs
        self.sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


def _is_index(t) -> bool:
    """An integer token id: int, a NumPy integer, an integer 0-d tensor (not a bool)."""
    if type(t) is int:  # the common case, without the call below
        return True
    if isinstance(t, bool):
        return False
    try:
        operator.index(t)
    except TypeError:
        return False
    return True


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.executor = make_executor(config)
        shards = config.parallel.num_kv_shards  # KV sequence shards (CP x DCP)
        self.layout = layout = self.executor.cache_layout()
        self.executor.init_cache(layout)
        num_blocks = layout.num_blocks * shards
        info = self.executor.cache_info()
        bs = config.cache.block_size
        spec = config.speculative
        self.blocks = BlockManager(num_blocks, bs, config.cache.enable_prefix_caching,
                                   hash_next_token=spec is not None, num_shards=shards)
        self.state = None
        if layout.num_state_slots:
            grid = layout.state_grid
            if config.scheduler.max_num_batched_tokens < grid:
                raise ValueError(f"this model's recurrent layers prefill in chunks of {grid} tokens: "
                                 f"raise --max-num-batched-tokens to at least {grid}")
            self.state = StateKeeper(layout.num_state_slots, layout.num_checkpoints,
                                     config.cache.state_checkpoint_interval, self.blocks, grid)
        self.spec_stats = SpecDecodeStats()
        self.num_spec_tokens = spec.num_speculative_tokens if spec else 0
        self.draft_depth = DraftDepth(spec.num_speculative_tokens, spec.min_draft_acceptance) if spec else None
        # the primary paged group frees blocks behind its window if it has one (Mistral: every
        # layer slides); the other groups (window layers beside full attention) have own tables
        primary, *others = [g for g, _ in layout.blocks]
        self.others = None
        if others:
            self.others = WindowGroups(
                {g: BlockManager(layout.group_blocks(g) * shards, bs, config.cache.enable_prefix_caching,
                                 hash_next_token=spec is not None, num_shards=shards) for g in others},
                {g: group_window(g) + (spec.window_lookback if spec else 0) for g in others})
        self.scheduler = Scheduler(config.scheduler, self.blocks, spec.speculate_up_to if spec else None,
                                   self.state, group_window(primary), self.others)
        self.cache_info = {**info, "num_blocks": num_blocks, "block_size": bs,
                           "num_state_slots": layout.num_state_slots,
                           "num_state_checkpoints": layout.num_checkpoints}
        log_cache(config, self.cache_info, layout)
        self.expert_stats: ExpertCacheStats | None = None
        if "expert_cache_budget_bytes" in info:
            self.expert_stats = ExpertCacheStats(budget_bytes=info["expert_cache_budget_bytes"],
                                                 num_slots=info["expert_cache_slots"],
                                                 expert_bytes=info["expert_bytes"])
            log.info("expert cache per rank: %d slots of %.1f MiB in a budget of %.0f MiB",
                     info["expert_cache_slots"], info["expert_bytes"] / 2**20,
                     info["expert_cache_budget_bytes"] / 2**20)
        self._expert_logged = time.monotonic()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = self.num_prompt_tokens = self.num_generated_tokens = 0
        self.num_finished = self.num_aborted = 0
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._grammars: GrammarChecker | None = None
        self._checked: dict[tuple, str] = {}  # structured-output constraint -> grammar
        self._released: list[int] = []  # sequences ended since the last step

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams, cache_salt: str | None = None) -> None:
        """Raise ValueError if the request can never run; called before anything is allocated."""
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt
                                       or len(cache_salt.encode()) > MAX_CACHE_SALT_BYTES):
            raise ValueError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_BYTES} "
                             "bytes (or unset)")
        vocab = self.config.model.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not (_is_index(t) and 0 <= t < vocab)]  # one pass over the prompt
        kinds = sorted({type(t).__name__ for t in bad if not _is_index(t)})
        if kinds:  # e.g. a text prompt passed as prompt_token_ids, or nested lists
            raise ValueError(f"token ids must be integers, got {', '.join(kinds)}: pass text as prompts, "
                             "or each prompt as a flat list of ints")
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
        limit = self.config.scheduler.max_model_len
        max_tokens = params.max_tokens or 1
        if len(prompt_ids) + max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"limit max_model_len={limit}; shorten the prompt or lower max_tokens"
            )
        cache_tokens = self.blocks.num_blocks * self.blocks.block_size
        sc = self.config.scheduler
        need = len(prompt_ids) + max_tokens + sc.num_lookahead_slots
        if self.scheduler.window is not None:  # it holds the window and one step's tokens at most
            need = min(need, self.scheduler.window + sc.max_num_batched_tokens + sc.num_lookahead_slots
                       + 2 * self.blocks.block_size)
        if need > cache_tokens:
            raise ValueError(
                f"prompt + max_tokens ({need} tokens with speculative slots) exceeds the whole KV "
                f"cache ({cache_tokens} tokens); raise --kv-cache-memory or shorten the request"
            )
        if params.structured_outputs is not None:
            self.grammar(params)

    def grammar(self, params: SamplingParams) -> str | None:
        """The request's checked llguidance grammar (None: unconstrained); ValueError if bad."""
        so = params.structured_outputs
        if so is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured output needs the tokenizer (the server runs --no-tokenizer)")
        if self._grammars is None:
            self._grammars = GrammarChecker(self.tokenizer, self.config.model.vocab_size)
        key = (so, self.config.model.vocab_size)
        if key not in self._checked:
            text = so.to_grammar()
            self._grammars.check(text)
            if len(self._checked) > 256:  # bounded: schemas are per request
                self._checked.clear()
            self._checked[key] = text
        return self._checked[key]

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, cache_salt: str | None = None) -> None:
        """Queue a request. ``cache_salt``: its prefix-cache namespace (requests with another
        salt, or none, never share its cached blocks)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_ids, params, cache_salt)
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, self.config.scheduler.max_model_len - len(prompt_ids)))
        now = time.monotonic()
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seqs = []
        for i in range(params.n):
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
                     if self.tokenizer is not None else None)
            seq = Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), params,
                           base_seed + i, detok, RequestMetrics(arrival_time=now), cache_salt=cache_salt)
            seq.banned_until_min = tuple(sorted(self.eos_token_ids | set(params.stop_token_ids)))
            seq.grammar = self.grammar(params)
            seq.leader = seqs[0] if seqs else None  # completion i > 0 shares 0's prompt blocks
            seq.fork_waiting = params.n - 1 if i == 0 else 0
            seqs.append(seq)
        self.requests[request_id] = Request(request_id, prompt, list(prompt_ids), seqs)
        for s in seqs:
            self.scheduler.add(s)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; returns its final output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        now = time.monotonic()
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
                s.metrics.finished_time = now
                self.scheduler.finish(s)
                self._released.append(s.seq_id)
        self.num_aborted += 1
        return self._output(req)

    def stats(self) -> dict:
        """Engine-wide counters (the gauges and totals a metrics endpoint exports)."""
        b, sch = self.blocks, self.scheduler
        return {
            "num_requests": len(self.requests),
            "num_seqs_running": len(sch.running),
            "num_seqs_waiting": len(sch.waiting),
            "kv_cache_usage": b.usage(),
            "num_blocks": b.num_blocks,
            "num_free_blocks": b.num_free,
            "prefix_cache_query_tokens": b.prefix_query_tokens,
            "prefix_cache_hit_tokens": b.prefix_hit_tokens,
            "num_preemptions": sch.num_preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens_computed": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "spec_decode": {**self.spec_stats.as_dict(),
                            "num_seqs_without_speculation": sch.num_without_speculation}
            if self.num_spec_tokens else None,
            "expert_cache": self.expert_stats.as_dict() if self.expert_stats is not None else None,
        }

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        k, propose = self._spec_k(sum(s.samples and bool(s.seq.speculate) for s in scheduled))
        released, self._released = tuple(self._released), []
        step = StepInput(next(self._step_ids), tuple(self.scheduler.work(s, k, propose) for s in scheduled),
                         released)
        result = self.executor.execute(step)
        now = time.monotonic()
        if result.experts is not None:
            self.expert_stats = result.experts
            if now - self._expert_logged >= EXPERT_LOG_EVERY_S:
                self._expert_logged = now
                self._log_experts()
        touched: dict[str, Request] = {}
        self.num_steps += 1
        for s in scheduled:
            seq = s.seq
            self.num_prompt_tokens += max(0, min(len(seq.prompt_token_ids) - seq.num_computed, s.num_new))
            seq.num_computed += s.num_new
            if seq.seq_id in result.hidden:
                seq.hidden_chunks.append(result.hidden[seq.seq_id])
            for j, (lp, top) in enumerate(result.prompt_logprobs.get(seq.seq_id, ())):
                pos = seq.num_computed - s.num_new + 1 + j  # the prompt token this row predicted
                seq.prompt_logprobs[pos] = {**dict(top), seq.token_ids[pos]: lp}
            sampled = result.sampled.get(seq.seq_id)
            if sampled is not None:
                if self.num_spec_tokens:
                    seq.num_computed += sampled.num_accepted  # their K/V were written by verification
                    seq.draft_token_ids = list(sampled.draft_token_ids)
                    self.spec_stats.record(sampled.num_drafts, sampled.num_accepted)
                    self.draft_depth.record(sampled.num_drafts, sampled.num_accepted)
                    seq.metrics.spec.record(sampled.num_drafts, sampled.num_accepted)
                before = len(seq.output_token_ids)
                append_tokens(seq, sampled, self.eos_token_ids, now)
                self.num_generated_tokens += len(seq.output_token_ids) - before
            # full blocks of verified tokens are hashed (prefill chunks included) before a window
            # group gives any back, so a later prefix finds the window blocks it needs
            self.blocks.commit(seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed,
                               seq.cache_root)
            if self.others is not None:
                self.others.commit(seq)
            self.scheduler.free_behind_window(seq)
            if self.state is not None:
                self.state.after_step(seq)
            if sampled is None:
                continue
            if seq.finished:
                self.scheduler.finish(seq)
                self._released.append(seq.seq_id)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                del self.requests[req.request_id]
                self.num_finished += 1
        return outputs

    def _log_experts(self) -> None:
        s = self.expert_stats
        log.info("expert cache: hit rate %.1f%% (%d hits, %d misses; %d prefetched, %d of them used), "
                 "%.2f MiB paged per token, %.0f MiB resident of a %.0f MiB budget per rank, "
                 "%.1f s waiting for loads, worker RssAnon %.0f MiB, RssFile %.0f MiB",
                 100 * s.hit_rate, s.hits, s.misses, s.prefetches, s.prefetch_hits,
                 s.bytes_per_token / 2**20, s.resident_bytes / 2**20, s.budget_bytes / 2**20, s.wait_s,
                 s.rss_anon_bytes / 2**20, s.rss_file_bytes / 2**20)

    def _spec_k(self, num_sampling: int) -> tuple[int, int]:
        """(drafts fed, drafts proposed) per sequence this step. Both are K, lowered when the
        batch would carry more than ``max_draft_tokens_per_step`` drafts (a large batch is
        compute-bound, so drafts there cost about as much as they save; with none, the MTP
        layer still keeps its cache). Proposals are further limited to the positions recent
        steps accepted often enough (``DraftDepth``, consulted only on steps that can propose);
        the depth never cuts what is fed, so a probe's drafts are verified unless the budget
        falls in between."""
        k = self.num_spec_tokens
        budget = self.config.speculative.max_draft_tokens_per_step if k else 0
        if budget and num_sampling * k > budget:
            k = budget // num_sampling
        return k, (min(k, self.draft_depth.limit()) if k and num_sampling else k)

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            outs.append(CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=s.logprobs if s.params.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob,
                text_delta=s.take_text_delta(), token_ids_delta=s.take_token_delta(),
                hidden_states=s.hidden_states() if s.finished and s.params.return_hidden_states else None,
            ))
        lead = req.seqs[0]
        prompt_lps = None
        if (lead.params.prompt_logprobs is not None and (req.finished or not req.sent_prompt_logprobs)
                and len(lead.prompt_logprobs) >= len(req.prompt_token_ids) - 1):
            # on the first output after the prefill (a stream echoes the prompt first) and the last
            prompt_lps = [None] + [lead.prompt_logprobs.get(p) for p in range(1, len(req.prompt_token_ids))]
            req.sent_prompt_logprobs = True
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             req.finished, lead.metrics, prompt_lps)

    def shutdown(self) -> None:
        if self.expert_stats is not None and self.expert_stats.tokens:
            self._log_experts()
        self.executor.shutdown()


