"""The offline Python API, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from dist_engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from dist_engine.engine.llm_engine import LLMEngine
from dist_engine.engine.outputs import RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.weights.registry import resolve_model

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLM:
    """``LLM(model=..., tensor_parallel_size=..., dtype=..., device=...)``; ``generate(...)``."""

    def __init__(self, model: str = "smollm2-135m-instruct", *, tensor_parallel_size: int = 1,
                 context_parallel_size: int = 1, decode_context_parallel_size: int = 1,
                 dtype: str = "float32", device: str = "cpu", max_model_len: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, memory_fraction: float = 0.5,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 executor: str = "auto", ray_address: str | None = None,
                 placement_strategy: str = "PACK", seed: int = 0,
                 cpu_threads: int | None = None, skip_tokenizer_init: bool = False,
                 shm_allreduce: bool = True, enforce_eager: bool = False,
                 speculative_config: dict | SpeculativeConfig | None = None) -> None:
        """``speculative_config``: e.g. ``{"method": "mtp", "num_speculative_tokens": 3}``
        (the model's own MTP layers, or the graft shipped for a known model), plus
        ``"model": DIR`` for a graft folder; see ``SpeculativeConfig`` for the rest."""
        path = resolve_model(model)
        mcfg = ModelConfig.from_pretrained(path)
        spec = None
        if speculative_config is not None:
            from dist_engine.graft.artifact import speculative_config as make_spec

            spec = make_spec(speculative_config, path, model, mcfg.num_nextn_predict_layers > 0)
        max_len = max_model_len or min(mcfg.max_position_embeddings, 8192)
        if max_num_batched_tokens is None:  # a CPU chunk of 512 takes ~1.5 s on the default model
            max_num_batched_tokens = 512 if device == "cpu" else 2048
        self.config = EngineConfig(
            model=mcfg,
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                    context_parallel_size=context_parallel_size,
                                    decode_context_parallel_size=decode_context_parallel_size,
                                    executor=executor,
                                    ray_address=ray_address, shm_allreduce=shm_allreduce,
                                    placement_strategy=placement_strategy),
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                              kv_cache_memory=kv_cache_memory, memory_fraction=memory_fraction,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max(max_num_batched_tokens, 1),
                                      max_model_len=max_len,
                                      num_lookahead_slots=spec.num_lookahead_slots if spec else 0),
            dtype=dtype, device=device, seed=seed, cpu_threads=cpu_threads, speculative=spec,
            enforce_eager=enforce_eager,
        )
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(path)
        self.engine = LLMEngine(self.config, self.tokenizer)
        self._ids = itertools.count()

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass prompt_token_ids instead")
            items = [(p, list(self.tokenizer.encode(p))) for p in prompts]
        else:
            items = [(None, list(ids)) for ids in prompt_token_ids]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, Sequence)
                  else [sampling_params] * len(items))
        if len(params) != len(items):
            raise ValueError(f"{len(params)} sampling_params for {len(items)} prompts")
        for (_, ids), p in zip(items, params):
            self.engine.validate(ids, p)  # reject before anything is queued
        order = []
        for (text, ids), p in zip(items, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, p, text)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
