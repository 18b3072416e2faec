"""The offline Python API, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from dist_engine.config.args import EngineArgs
from dist_engine.engine.chat import ChatPrompt
from dist_engine.engine.llm_engine import LLMEngine
from dist_engine.engine.outputs import RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.weights.registry import resolve_model

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLM:
    """``LLM(model=..., tensor_parallel_size=..., dtype=..., device=...)``; ``generate(...)``.

    The keyword arguments are ``EngineArgs``' fields (``dist_engine.config.args``, where every
    default is set once for this class, ``AsyncLLM`` and the CLI), e.g. ``kv_cache_memory="2GiB"``,
    ``speculative="none"`` or ``speculative_config={"num_speculative_tokens": 3}``.
    """

    def __init__(self, model: str | None = None, *, engine_args: EngineArgs | None = None,
                 chat_template: str | None = None, raw_special_tokens: bool = False,
                 **kwargs) -> None:
        if engine_args is not None and (model is not None or kwargs):
            raise ValueError("pass either engine_args or the model and keyword arguments, not both")
        self.args = args = engine_args or EngineArgs.from_kwargs(model, **kwargs)
        path = resolve_model(args.model)
        self.config = args.engine_config(path)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(path)
        self.engine = LLMEngine(self.config, self.tokenizer)
        self._ids = itertools.count()
        self._chat_settings = (chat_template, raw_special_tokens)
        self._chat: ChatPrompt | None = None

    @property
    def chat(self) -> ChatPrompt:
        """The chat template (the model's, or ``chat_template``) applied safely to messages."""
        if self.tokenizer is None:
            raise ValueError("chat messages need a tokenizer; pass prompt_token_ids instead")
        if self._chat is None:
            self._chat = ChatPrompt(self.tokenizer, *self._chat_settings)
        return self._chat

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        """Token ids of ``messages`` with the generation prompt (``tools=`` and template
        arguments pass through); special-token text in content stays text unless this LLM was
        built with ``raw_special_tokens=True``."""
        return self.chat.encode(messages, **kwargs)

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = False, cache_salt: str | None = None) -> list[RequestOutput]:
        """``cache_salt``: the prefix-cache namespace of these requests (only requests with the
        same salt share cached blocks)."""
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
            self.engine.validate(ids, p, cache_salt)  # reject before anything is queued
        order = []
        for (text, ids), p in zip(items, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, p, text, cache_salt)
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
