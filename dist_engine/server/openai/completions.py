"""``POST /v1/completions``: text or token-id prompts (one or a list), ``echo`` with prompt
logprobs (what lm-evaluation-harness scores loglikelihoods with; ``max_tokens=0`` scores the
prompt alone), streaming as server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from dist_engine.engine.outputs import CompletionOutput, RequestOutput
from dist_engine.server.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from dist_engine.server.openai.serving import (
    Context,
    finals,
    primed,
    sampling_params,
    sse,
    sse_stream,
    token_text,
    usage,
)


def _prompts(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise ValueError("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [{"prompt_token_ids": list(p)} for p in prompt]


class Logprobs:
    """Builds the completions API's logprobs object token by token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.out = CompletionLogprobs()
        self.offset = 0

    def add(self, token_id: int, entry: dict[int, float] | None) -> None:
        text = token_text(self.tokenizer, token_id)
        self.out.tokens.append(text)
        self.out.token_logprobs.append(None if entry is None else entry.get(token_id))
        self.out.top_logprobs.append(None if entry is None else {
            token_text(self.tokenizer, t): lp for t, lp in entry.items()})
        self.out.text_offset.append(self.offset)
        self.offset += len(text)


def _prompt_text(ctx: Context, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return ctx.llm.tokenizer.decode(out.prompt_token_ids) if ctx.llm.tokenizer else ""


async def create(ctx: Context, req: CompletionRequest, raw: Request, tenant: str | None):
    ctx.check_model(req.model)
    prompts = _prompts(req.prompt)
    score_only = req.max_tokens == 0  # echo the prompt with its logprobs, generate nothing
    params = sampling_params(
        req, 1 if score_only else req.max_tokens, logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
    streams = [ctx.front.generate(params, tenant=tenant, cache_salt=req.cache_salt, prefix="cmpl",
                                  **p) for p in prompts]
    rid, model = new_id("cmpl"), ctx.front.name
    if not req.stream:
        outs = await finals(raw, streams)
        choices = [_choice(ctx, req, i * params.n + c.index, o, c, score_only)
                   for i, o in enumerate(outs) for c in o.outputs]
        u = usage(outs)
        if score_only:
            u.completion_tokens, u.total_tokens = 0, u.prompt_tokens
        return CompletionResponse(id=rid, model=model, choices=choices, usage=u)
    streams = [await primed(s) for s in streams]
    return StreamingResponse(sse_stream(_events(ctx, req, rid, streams, params.n, score_only)),
                             media_type="text/event-stream")


def _choice(ctx: Context, req: CompletionRequest, index: int, out: RequestOutput,
            c: CompletionOutput, score_only: bool) -> CompletionChoice:
    text = "" if score_only else c.text
    lp = None
    if req.logprobs is not None:
        lp = Logprobs(ctx.llm.tokenizer)
        if req.echo:
            for tok, entry in zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)):
                lp.add(tok, entry)
        if not score_only:
            for tok, entry in zip(c.token_ids, c.logprobs or []):
                lp.add(tok, entry)
        lp = lp.out
    if req.echo:
        text = _prompt_text(ctx, out) + text
    return CompletionChoice(index=index, text=text, logprobs=lp,
                            token_ids=(c.token_ids if req.return_token_ids and not score_only else None),
                            finish_reason="length" if score_only else c.finish_reason,
                            stop_reason=c.stop_reason)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _events(ctx: Context, req: CompletionRequest, rid: str, streams, n: int,
                  score_only: bool) -> AsyncIterator[str]:
    finished: list[RequestOutput] = []
    echoed: set[int] = set()
    async for i, out in _merge(streams):
        choices = []
        for c in out.outputs:
            index = i * n + c.index
            text = "" if score_only else c.text_delta
            lp = None
            first = req.echo and index not in echoed  # the prompt goes out with the first chunk
            if req.logprobs is not None:
                b = Logprobs(ctx.llm.tokenizer)
                if first:
                    for tok, entry in zip(out.prompt_token_ids, out.prompt_logprobs or []):
                        b.add(tok, entry)
                start = len(c.token_ids) - len(c.token_ids_delta)
                for tok, entry in zip(c.token_ids_delta, (c.logprobs or [])[start:]):
                    if not score_only:
                        b.add(tok, entry)
                lp = b.out
            if first:
                text = _prompt_text(ctx, out) + text
                echoed.add(index)
            if text or c.finished or (lp is not None and lp.tokens) or c.token_ids_delta:
                choices.append(CompletionChoice(
                    index=index, text=text, logprobs=lp,
                    token_ids=list(c.token_ids_delta) if req.return_token_ids else None,
                    finish_reason=("length" if score_only else c.finish_reason) if c.finished else None,
                    stop_reason=c.stop_reason if c.finished else None))
        if out.finished:
            finished.append(out)
        if choices:
            yield sse(CompletionResponse(id=rid, model=ctx.front.name, choices=choices))
    if req.stream_options and req.stream_options.include_usage:
        u = usage(finished)
        if score_only:
            u.completion_tokens, u.total_tokens = 0, u.prompt_tokens
        yield sse(CompletionResponse(id=rid, model=ctx.front.name, choices=[], usage=u))
