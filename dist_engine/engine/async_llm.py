"""asyncio API: ``async for out in llm.generate(...)`` streams deltas while others run.

One engine thread owns the LLMEngine and steps it whenever any request is unfinished; callers
on any event loop hand it requests and aborts through a queue and receive each step's
RequestOutput (with ``text_delta`` / ``token_ids_delta``) on their own asyncio queue. A caller
that stops iterating (break, cancellation, client disconnect) aborts its request, which frees
its KV blocks at the next step boundary. If the engine dies, every open stream raises the error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dist_engine.engine.chat import ChatPrompt
from dist_engine.engine.llm import LLM
from dist_engine.engine.outputs import RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.worker.executor import EngineDeadError

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 2.0  # how often an idle engine checks that its workers are alive
TOKENIZER_THREADS = 2  # prompts tokenized at once, off the callers' event loops


class QueueFullError(RuntimeError):
    """More sequences in flight than the caller's ``queue_limit`` allows; retry later."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items (the last one finished) or an exception
    num_seqs: int = 1  # the request's n: admission counts sequences, not requests

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    """``AsyncLLM(model=..., **EngineArgs fields)`` (as ``LLM``); ``generate`` is an async
    iterator of outputs."""

    def __init__(self, model: str | None = None, *, chat_template: str | None = None,
                 raw_special_tokens: bool = False, **kwargs) -> None:
        self._llm = LLM(model, chat_template=chat_template, raw_special_tokens=raw_special_tokens,
                        **kwargs)
        self.engine = self._llm.engine
        self.tokenizer = self._llm.tokenizer
        self.config = self._llm.config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._open_seqs = 0
        # Tokenizers' Rust core and the template render run here, so a long prompt never stalls
        # the event loop that serves every other stream and the health checks
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="dist-engine-tokenize")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._closed = False
        self._stats: dict = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="dist-engine-loop", daemon=True)
        self._thread.start()

    # ---- public API --------------------------------------------------------------------------
    @property
    def chat(self) -> ChatPrompt:
        return self._llm.chat

    def encode(self, prompt: str | None, prompt_token_ids: list[int] | None,
               messages: list[dict] | None = None, chat: ChatPrompt | None = None,
               **chat_kwargs) -> list[int]:
        """Token ids of exactly one of the three inputs (blocking: call ``encode_async`` from
        a loop). Text that cannot fit ``max_model_len`` is refused from its length before it
        is tokenized; chat messages go through ``ChatPrompt`` (``chat``, default the model's
        template: roles checked, special-token text in content kept as text)."""
        given = [x is not None for x in (prompt, prompt_token_ids, messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of a prompt, prompt_token_ids or chat messages")
        if prompt_token_ids is not None:
            return list(prompt_token_ids)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass prompt_token_ids instead")
        limit = self.config.scheduler.max_model_len
        if messages is not None:
            chat = chat or self.chat
            chat.check_fits(_text_bytes([messages, chat_kwargs]), limit, "the conversation")
            return chat.encode(messages, **chat_kwargs)
        self.chat.check_fits(_text_bytes(prompt), limit)
        return list(self.tokenizer.encode(prompt))

    async def encode_async(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                           messages: list[dict] | None = None, chat: ChatPrompt | None = None,
                           **chat_kwargs) -> list[int]:
        """``encode`` in the tokenizer threads (the length check runs first, on the loop)."""
        if prompt_token_ids is not None or self.tokenizer is None:
            return self.encode(prompt, prompt_token_ids, messages, chat, **chat_kwargs)
        limit = self.config.scheduler.max_model_len
        text = prompt if messages is None else [messages, chat_kwargs]
        (chat or self.chat).check_fits(_text_bytes(text), limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenize_pool, lambda: self.encode(prompt, None, messages, chat, **chat_kwargs))

    async def generate(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, prompt_token_ids: list[int] | None = None,
                       messages: list[dict] | None = None, cache_salt: str | None = None,
                       queue_limit: int | None = None, chat: ChatPrompt | None = None,
                       chat_kwargs: dict | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one RequestOutput per engine step that advanced the request; the last is final.

        Bad input raises ValueError before anything is queued. ``cache_salt``: the request's
        prefix-cache namespace (only requests with the same salt share cached blocks).
        ``queue_limit``: raise ``QueueFullError`` if the sequences in flight (each request
        counts its ``n``, tokenizing ones included) would exceed it. ``chat`` / ``chat_kwargs``:
        the template (default: the model's) and its arguments (tools, ...) for ``messages``.
        """
        params = sampling_params or SamplingParams()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(f"the engine has stopped: {self._error}")
            if self._closed:
                raise RuntimeError("AsyncLLM is shut down")
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            if queue_limit is not None and self._open_seqs + params.n > queue_limit:
                raise QueueFullError(f"server busy: {self._open_seqs} sequences in flight, the "
                                     f"limit is {queue_limit}; retry later")
            self._streams[rid] = stream
            self._open_seqs += params.n
        queued = finished = False
        try:
            ids = await self.encode_async(prompt, prompt_token_ids, messages, chat, **(chat_kwargs or {}))
            if params.structured_outputs is None:
                self.engine.validate(ids, params, cache_salt)
            else:  # compiling and checking a grammar can take a while: not on the loop
                await asyncio.get_running_loop().run_in_executor(
                    self._tokenize_pool, self.engine.validate, ids, params, cache_salt)
            self._inbox.put(("add", rid, ids, params, prompt, cache_salt))
            queued = True
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if queued and not finished:
                self._inbox.put(("abort", rid))
            elif not queued:
                self._forget(rid)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> dict:
        """A snapshot of engine counters taken by the engine thread after its last step."""
        return dict(self._stats)

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def num_open_seqs(self) -> int:
        """Sequences of the open streams (a request counts its ``n``)."""
        return self._open_seqs

    @property
    def is_dead(self) -> bool:
        return self._error is not None

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._llm.shutdown()

    # ---- engine thread -------------------------------------------------------------------------
    def _handle(self, cmd: tuple) -> bool:
        if cmd[0] == "stop":
            return False
        if cmd[0] == "add":
            _, rid, ids, params, prompt, salt = cmd
            try:
                self.engine.add_request(rid, ids, params, prompt, salt)
            except ValueError as e:  # already validated by the caller; report, never crash
                self._close_stream(rid, e)
        elif cmd[0] == "abort":
            rid = cmd[1]
            final = self.engine.abort_request(rid)  # None if it had already finished
            self._close_stream(rid, final)
        return True

    def _forget(self, rid: str) -> _Stream | None:
        with self._lock:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                self._open_seqs -= stream.num_seqs
        return stream

    def _close_stream(self, rid: str, item) -> None:
        stream = self._forget(rid)
        if stream is not None and item is not None:
            stream.put(item)

    def _commands(self, wait: bool) -> list[tuple]:
        """Everything queued for the engine thread; waits up to 0.5 s for one if ``wait``."""
        cmds = []
        try:
            cmds.append(self._inbox.get(timeout=0.5) if wait else self._inbox.get_nowait())
            while True:
                cmds.append(self._inbox.get_nowait())
        except queue.Empty:
            return cmds

    def _run(self) -> None:
        last_check = time.monotonic()
        try:
            while True:
                cmds = self._commands(wait=not self.engine.has_unfinished())
                for cmd in cmds:
                    if not self._handle(cmd):
                        return
                if cmds:  # aborts count now, not after the next step
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished() and time.monotonic() - last_check > HEALTH_EVERY_S:
                    # idle: nothing would notice a lost worker until the next request
                    self.engine.executor.check_health()
                    last_check = time.monotonic()
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            stream = self._forget(out.request_id)
                        else:
                            with self._lock:
                                stream = self._streams.get(out.request_id)
                        if stream is not None:
                            stream.put(out)
                self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - every open stream must hear about it
            log.exception("engine loop stopped")
            with self._lock:
                self._error = e
                streams, self._streams, self._open_seqs = list(self._streams.values()), {}, 0
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(f"engine loop failed: {e!r}")
            for stream in streams:
                stream.put(err)


def _text_bytes(x) -> int:
    """UTF-8 bytes of a prompt, or of every string in chat messages (a lower bound on what the
    rendered conversation holds)."""
    if isinstance(x, str):
        try:
            return len(x.encode())
        except UnicodeEncodeError:
            raise ValueError("the prompt is not valid UTF-8 (it holds a lone surrogate)") from None
    if isinstance(x, dict):
        return sum(_text_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_text_bytes(v) for v in x)
    return 0
