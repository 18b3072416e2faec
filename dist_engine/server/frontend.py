"""What every protocol front (gRPC Generation, KServe, OpenAI HTTP) does before and around
``AsyncLLM.generate``: the server's limits, ids, tenants' cache namespaces and error wording.

- ``n`` is bounded (``--max-n``) and admission counts sequences: a request holds ``n`` of the
  ``--max-queued-requests`` places from before it is tokenized until it ends.
- A client's ``request_id`` is at most 256 bytes and only echoed: the engine's id is made here,
  so one caller's id can neither collide with nor reveal another caller's request.
- The prefix-cache namespace comes from ``--prefix-cache-isolation`` (``security.effective_salt``).
- A dead engine's error (Ray actor ids, pids, node addresses) goes to the server log; clients
  get a plain sentence.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from dist_engine.engine.async_llm import AsyncLLM
from dist_engine.engine.llm_engine import MAX_CACHE_SALT_BYTES
from dist_engine.engine.outputs import RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.server.metrics import ServerMetrics
from dist_engine.server.options import ServerLimits
from dist_engine.server.security import effective_salt

log = logging.getLogger(__name__)
MAX_REQUEST_ID_BYTES = 256
ENGINE_UNAVAILABLE = "the engine is unavailable (a worker stopped); retry once the server restarts"


def check_request_id(request_id: str | None) -> str:
    if request_id is None:
        return ""
    if not isinstance(request_id, str) or len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise ValueError(f"request_id must be a string of at most {MAX_REQUEST_ID_BYTES} bytes")
    return request_id


class Frontend:
    def __init__(self, llm: AsyncLLM, served_model_name: str, limits: ServerLimits,
                 metrics: ServerMetrics | None = None) -> None:
        self.llm = llm
        self.name = served_model_name
        self.limits = limits
        self.metrics = metrics

    def check_model(self, model: str | None) -> None:
        if model and model != self.name:
            raise ValueError(f"unknown model {model!r}; this server serves {self.name!r}")

    def check_params(self, params: SamplingParams) -> None:
        if params.n > self.limits.max_n:
            raise ValueError(f"n={params.n} is over this server's limit of {self.limits.max_n} "
                             "completions per request (--max-n)")

    def cache_salt(self, tenant: str | None, client_salt: str | None) -> str | None:
        if client_salt is not None and (not isinstance(client_salt, str) or not client_salt
                                        or len(client_salt.encode()) > MAX_CACHE_SALT_BYTES):
            raise ValueError(f"cache_salt must be a non-empty string of at most "
                             f"{MAX_CACHE_SALT_BYTES} bytes (or unset)")
        return effective_salt(self.limits.isolation, tenant, client_salt)

    async def generate(self, params: SamplingParams, *, tenant: str | None = None,
                       cache_salt: str | None = None, prefix: str = "req",
                       **inputs) -> AsyncIterator[RequestOutput]:
        """``AsyncLLM.generate`` under this server's limits; ``inputs``: prompt,
        prompt_token_ids, messages, chat_kwargs. Raises ValueError (bad input),
        ``QueueFullError`` (busy) or ``EngineDeadError`` (with a message fit for clients)."""
        self.check_params(params)
        salt = self.cache_salt(tenant, cache_salt)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        stream = self.llm.generate(sampling_params=params, request_id=rid, cache_salt=salt,
                                   queue_limit=self.limits.max_queued_seqs, **inputs)
        async with contextlib.aclosing(stream):  # a caller that stops early aborts at once
            async for out in stream:
                if out.finished and self.metrics is not None:
                    self.metrics.observe(out.metrics)
                yield out


def public_error(e: BaseException) -> str:
    """The message a client sees for an engine failure; the details go to the log."""
    log.error("request failed, engine unavailable: %s", e)
    return ENGINE_UNAVAILABLE
