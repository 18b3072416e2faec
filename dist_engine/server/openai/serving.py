"""What the completions and chat routes share: request -> SamplingParams, usage, token text,
server-sent events, and running a request to its end unless the client goes away."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from dist_engine.engine.chat import ChatPrompt
from dist_engine.engine.outputs import RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.engine.structured import StructuredOutputs
from dist_engine.server.frontend import Frontend
from dist_engine.server.openai.errors import UnknownModel, as_api_error, error_body
from dist_engine.server.openai.protocol import PromptTokensDetails, SamplingFields, Usage
from dist_engine.server.openai.tool_parsers import Terminals
from dist_engine.server.security import ApiKeys


@dataclass
class Context:
    """Everything a route needs, built once by ``app.build_app``."""

    front: Frontend
    keys: ApiKeys | None
    tool_parser: str | None  # --tool-call-parser, or detected from the template
    auto_tools: bool  # --enable-auto-tool-choice
    reasoning_parser: str | None
    tool_chat: ChatPrompt | None  # the template for requests with tools, if not the model's

    @property
    def llm(self):
        return self.front.llm

    @functools.cached_property
    def terminals(self) -> Terminals:
        """How tool-call grammars write a format's markers with this model's tokenizer."""
        return Terminals(self.llm.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model and model != self.front.name:
            raise UnknownModel(model, self.front.name)


def structured(req: SamplingFields) -> StructuredOutputs | None:
    """The request's output constraint: ``response_format`` or vLLM's ``structured_outputs``."""
    if req.response_format is not None and req.structured_outputs is not None:
        raise ValueError("give response_format or structured_outputs, not both")
    fmt = req.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            return StructuredOutputs(json_object=True)
        if fmt.type == "json_schema":
            return StructuredOutputs(json=fmt.json_schema.schema_)
        return None
    so = req.structured_outputs
    if so is None:
        return None
    return StructuredOutputs(json=so.json_, json_object=so.json_object, regex=so.regex,
                             grammar=so.grammar, choice=so.choice)


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, skip_special_tokens: bool | None = None,
                    constraint: StructuredOutputs | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request; ValueError (400) for values it refuses.
    ``constraint``: an output grammar the caller derived (tool_choice), else the request's."""
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = float(value)
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    kw = {name: getattr(req, name) for name in ("temperature", "top_p", "min_p") if getattr(req, name) is not None}
    if req.top_k is not None:
        kw["top_k"] = 0 if req.top_k == -1 else req.top_k
    return SamplingParams(
        n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, max_tokens=max_tokens,
        min_tokens=req.min_tokens, stop=() if req.stop is None else req.stop,
        stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=bias,
        structured_outputs=constraint or structured(req),
        skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
        **kw)


def usage(outs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.metrics.prefix_hit_tokens for o in outs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"


def sse(payload) -> str:
    body = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {body}\n\n"


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Events, then ``[DONE]``; an error after the stream began is sent as an error event (the
    status line is gone by then), as OpenAI's server does."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001 - reported in the stream, never a broken connection
        err = as_api_error(e)
        yield sse(json.dumps(error_body(err.status, err.message, err.param, err.code)))
    yield "data: [DONE]\n\n"


async def primed(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """``stream`` with its first output already awaited, so bad input, a full queue or a dead
    engine surface as an HTTP status before a streamed response has begun."""
    first = await stream.__anext__()

    async def rest():
        try:
            yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()
    return rest()


async def finals(request: Request, streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's final output; if one fails the others are cancelled, and a client that
    disconnects first cancels them all (which aborts the requests and frees their blocks)."""

    async def last(stream):
        final = None
        async for out in stream:
            final = out
        return final

    async def disconnected():
        while True:  # the body was read: the next message is the disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    watch = asyncio.ensure_future(disconnected())
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                raise asyncio.CancelledError("the client disconnected")
            pending.discard(watch)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        return [t.result() for t in tasks]
    finally:
        watch.cancel()
        for t in tasks:
            t.cancel()
