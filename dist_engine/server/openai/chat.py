"""``POST /v1/chat/completions``: messages through the chat template (tools included), the
answer split into reasoning, content and tool calls, streamed as ``chat.completion.chunk``s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from dist_engine.engine.outputs import CompletionOutput, RequestOutput
from dist_engine.engine.structured import StructuredOutputs
from dist_engine.server.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
    NamedToolChoice,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    new_id,
)
from dist_engine.server.openai.reasoning import ReasoningStream, get_reasoning_parser
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
from dist_engine.server.openai.tool_parsers import ToolCallStream, ToolParser, get_parser


def message_dict(m: ChatMessage) -> dict:
    """A message as chat templates take it: text parts joined, tool-call arguments as objects."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") not in ("text", "input_text", "output_text"):
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported "
                                 "(this server serves a text model)")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    out = {"role": m.role, "content": content}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                args = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"tool call {call.id}: arguments are not JSON") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": args}})
        out["tool_calls"] = calls
    for key in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


@dataclass
class Plan:
    """How one chat request is rendered and read back."""

    tools: list[dict] | None  # rendered into the prompt
    parser: ToolParser | None  # reads tool calls out of the answer
    reasoning: bool
    constraint: StructuredOutputs | None = None  # tool_choice required / named: calls only


def plan(ctx: Context, req: ChatCompletionRequest) -> Plan:
    choice = req.tool_choice or ("auto" if req.tools else "none")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and choice != "none" else None
    parser = None
    if tools:
        if ctx.tool_parser is None:
            raise ValueError("tools need a tool-call parser: start the server with --tool-call-parser "
                             "(or a chat template whose tool markers name one)")
        if choice == "auto" and not ctx.auto_tools:
            raise ValueError('tool_choice "auto" needs the server started with '
                             "--enable-auto-tool-choice")
        parser = get_parser(ctx.tool_parser)
    constraint = None
    if tools and choice != "auto":  # required, or one named function: the grammar guarantees it
        if req.response_format is not None or req.structured_outputs is not None:
            raise ValueError("tool_choice required or named cannot be combined with response_format")
        named = choice.function.get("name") if isinstance(choice, NamedToolChoice) else None
        constraint = StructuredOutputs(grammar=parser.grammar(tools, named, req.parallel_tool_calls,
                                                             ctx.terminals))
    return Plan(tools, parser, ctx.reasoning_parser is not None, constraint)


def _split(ctx: Context, p: Plan, text: str) -> tuple[str | None, str | None, list]:
    reasoning, content = None, text
    if p.reasoning:
        reasoning, content, _ = get_reasoning_parser(ctx.reasoning_parser).split(text)
    calls = []
    if p.parser is not None and content:
        content, calls = p.parser.parse(content)
    return reasoning, content, calls


def _logprobs(tokenizer, ids: list[int], entries: list[dict[int, float]]) -> ChoiceLogprobs:
    items = []
    for tok, entry in zip(ids, entries):
        text = token_text(tokenizer, tok)
        top = [TopLogprob(token=token_text(tokenizer, t), logprob=lp,
                          bytes=list(token_text(tokenizer, t).encode()))
               for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]) if t != tok]
        items.append(TokenLogprob(token=text, logprob=entry.get(tok, 0.0), bytes=list(text.encode()),
                                  top_logprobs=top))
    return ChoiceLogprobs(content=items)


def start(ctx: Context, req: ChatCompletionRequest, tenant: str | None):
    """(plan, n, the request's output stream) for a chat request."""
    ctx.check_model(req.model)
    p = plan(ctx, req)
    messages = [message_dict(m) for m in req.messages]
    uses_tools = p.tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    chat = ctx.tool_chat if uses_tools and ctx.tool_chat is not None else None
    params = sampling_params(
        req, req.max_completion_tokens or req.max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        skip_special_tokens=False if p.parser is not None and p.parser.needs_special_tokens else None,
        constraint=p.constraint)
    kwargs = {**(req.chat_template_kwargs or {}), "tools": p.tools,
              "add_generation_prompt": req.add_generation_prompt}
    stream = ctx.front.generate(params, tenant=tenant, cache_salt=req.cache_salt, prefix="chatcmpl",
                                messages=messages, chat=chat, chat_kwargs=kwargs)
    return p, params.n, stream


def split(ctx: Context, p: Plan, c: CompletionOutput) -> tuple[str | None, str | None, list, str | None]:
    """(reasoning, content, tool calls, finish reason) of a finished completion."""
    reasoning, content, calls = _split(ctx, p, c.text)
    return reasoning, content, calls, "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason


async def create(ctx: Context, req: ChatCompletionRequest, raw: Request, tenant: str | None):
    p, n, stream = start(ctx, req, tenant)
    rid = new_id("chatcmpl")
    if not req.stream:
        (out,) = await finals(raw, [stream])
        choices = []
        for c in out.outputs:
            reasoning, content, calls, finish = split(ctx, p, c)
            choices.append(ChatChoice(
                index=c.index, finish_reason=finish, stop_reason=c.stop_reason,
                message=ResponseMessage(content=content, reasoning_content=reasoning, tool_calls=calls),
                token_ids=c.token_ids if req.return_token_ids else None,
                logprobs=_logprobs(ctx.llm.tokenizer, c.token_ids, c.logprobs or [])
                if req.logprobs else None))
        return ChatCompletionResponse(id=rid, model=ctx.front.name, choices=choices, usage=usage([out]))
    stream = await primed(stream)
    return StreamingResponse(sse_stream(_events(ctx, req, p, rid, stream, n)),
                             media_type="text/event-stream")


class ChoiceStream:
    """One choice's text deltas -> reasoning / content / tool-call deltas."""

    def __init__(self, ctx: Context, p: Plan) -> None:
        self.reasoning = ReasoningStream(get_reasoning_parser(ctx.reasoning_parser)) if p.reasoning else None
        self.tools = ToolCallStream(p.parser) if p.parser is not None else None

    def feed(self, text: str, final: bool) -> DeltaMessage:
        reasoning, content = (self.reasoning.feed(text, final) if self.reasoning else ("", text))
        calls = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
        return DeltaMessage(content=content or None, reasoning_content=reasoning or None,
                            tool_calls=calls or None)


async def _events(ctx: Context, req: ChatCompletionRequest, p: Plan, rid: str,
                  stream: AsyncIterator[RequestOutput], n: int) -> AsyncIterator[str]:
    name = ctx.front.name
    yield sse(ChatCompletionChunk(id=rid, model=name, choices=[
        ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)]))
    states = [ChoiceStream(ctx, p) for _ in range(n)]
    last = None
    async for out in stream:
        last = out
        choices = [ch for c in out.outputs if (ch := _chunk(ctx, req, states[c.index], c)) is not None]
        if choices:
            yield sse(ChatCompletionChunk(id=rid, model=name, choices=choices))
    if req.stream_options and req.stream_options.include_usage and last is not None:
        yield sse(ChatCompletionChunk(id=rid, model=name, choices=[], usage=usage([last])))


def _chunk(ctx: Context, req: ChatCompletionRequest, state: ChoiceStream,
           c: CompletionOutput) -> ChatChunkChoice | None:
    if not (c.text_delta or c.token_ids_delta or c.finished):
        return None
    delta = state.feed(c.text_delta, c.finished)
    lp = None
    if req.logprobs and c.token_ids_delta:
        start = len(c.token_ids) - len(c.token_ids_delta)
        lp = _logprobs(ctx.llm.tokenizer, c.token_ids_delta, (c.logprobs or [])[start:])
    finish = None
    if c.finished:
        called = state.tools is not None and state.tools.called
        finish = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
    if delta.content is None and delta.reasoning_content is None and not delta.tool_calls \
            and lp is None and finish is None and not (req.return_token_ids and c.token_ids_delta):
        return None
    return ChatChunkChoice(index=c.index, delta=delta, logprobs=lp, finish_reason=finish,
                           token_ids=list(c.token_ids_delta) if req.return_token_ids else None)
