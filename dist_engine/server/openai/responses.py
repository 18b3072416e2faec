"""``POST /v1/responses``: the Responses API coding agents speak, over the chat pipeline.

Input is a string or a list of items (messages, ``function_call`` and ``function_call_output``
items from earlier turns); ``instructions`` become the system message; function tools are
given flat (``{"type": "function", "name", "parameters"}``). Output items: ``reasoning`` (with
a reasoning parser), one ``message`` with ``output_text``, and ``function_call`` items.
Streaming sends the typed events (``response.created``, ``response.reasoning_text.delta``,
``response.output_text.delta``, ``response.function_call_arguments.done``,
``response.completed``, ...). Stateless: no
``previous_response_id`` (send the conversation again, as with ``store: false``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator

from dist_engine.server.openai import chat
from dist_engine.server.openai.protocol import ChatCompletionRequest, new_id
from dist_engine.server.openai.protocol import Request as Body
from dist_engine.server.openai.serving import Context, finals, primed, sse_stream


class ResponsesRequest(Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _stateless(self):
        if self.previous_response_id:
            raise ValueError("previous_response_id is not supported: this server stores no "
                             "responses; send the whole conversation as input")
        return self


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    messages: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": item.get("content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or new_id("call"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": item.get("output", "")})
        elif kind != "reasoning":  # earlier reasoning items are not fed back
            raise ValueError(f"input items of type {kind!r} are not supported")
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
             for t in req.tools or [] if t.get("type") == "function"]
    if req.tools and len(tools) < len(req.tools):
        raise ValueError("only function tools are supported")
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return ChatCompletionRequest(
        model=req.model, messages=messages, tools=tools or None, tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls, max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed)


def _message(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _reasoning(text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": new_id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _call(name: str, arguments: str, call_id: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _response(rid: str, model: str, req: ResponsesRequest, output: list, out=None,
              status: str = "completed") -> dict:
    """The response object; the request's tool settings are echoed, as OpenAI's are (typed
    clients require them)."""
    body = {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "model": model, "output": output, "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls}
    if out is not None:
        done = out.outputs[0]
        body["usage"] = {"input_tokens": len(out.prompt_token_ids),
                         # cache writes are not priced apart here: reported as none
                         "input_tokens_details": {"cached_tokens": out.metrics.prefix_hit_tokens,
                                                  "cache_write_tokens": 0},
                         "output_tokens": len(done.token_ids),
                         "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": len(out.prompt_token_ids) + len(done.token_ids)}
    return body


async def create(ctx: Context, req: ResponsesRequest, raw: Request, tenant: str | None):
    creq = to_chat(req)
    p, _, stream = chat.start(ctx, creq, tenant)
    rid = new_id("resp")
    if not req.stream:
        (out,) = await finals(raw, [stream])
        reasoning, content, calls, _ = chat.split(ctx, p, out.outputs[0])
        items = [_reasoning(reasoning)] if reasoning else []
        if content:
            items.append(_message(content))
        items += [_call(c.function.name, c.function.arguments, c.id) for c in calls]
        return _response(rid, ctx.front.name, req, items, out)
    stream = await primed(stream)
    return StreamingResponse(sse_stream(_events(ctx, req, p, rid, stream)), media_type="text/event-stream")


class _Events:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **body) -> str:
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': self.seq, **body})}\n\n"


async def _events(ctx: Context, req: ResponsesRequest, p: chat.Plan, rid: str, stream) -> AsyncIterator[str]:
    ev, name = _Events(), ctx.front.name
    yield ev("response.created", response=_response(rid, name, req, [], status="in_progress"))
    state = chat.ChoiceStream(ctx, p)
    items: list[dict] = []
    text: dict | None = None  # the open message item
    thought: dict | None = None  # the reasoning item
    calls: dict[int, dict] = {}
    last = None
    async for out in stream:
        last = out
        c = out.outputs[0]
        delta = state.feed(c.text_delta, c.finished)
        if delta.reasoning_content:
            if thought is None:
                thought = _reasoning("", "in_progress")
                items.append(thought)
                yield ev("response.output_item.added", output_index=len(items) - 1, item=thought)
            thought["content"][0]["text"] += delta.reasoning_content
            yield ev("response.reasoning_text.delta", item_id=thought["id"],
                     output_index=items.index(thought), content_index=0, delta=delta.reasoning_content)
        if delta.content:
            if text is None:
                text = _message("", "in_progress")
                items.append(text)
                yield ev("response.output_item.added", output_index=len(items) - 1, item=text)
                yield ev("response.content_part.added", item_id=text["id"], output_index=len(items) - 1,
                         content_index=0, part={"type": "output_text", "text": "", "annotations": []})
            text["content"][0]["text"] += delta.content
            yield ev("response.output_text.delta", item_id=text["id"], output_index=items.index(text),
                     content_index=0, delta=delta.content, logprobs=[])
        for frag in delta.tool_calls or []:
            if frag.index not in calls:
                calls[frag.index] = _call(frag.function.name, "", frag.id, "in_progress")
                items.append(calls[frag.index])
                yield ev("response.output_item.added", output_index=len(items) - 1, item=calls[frag.index])
            item = calls[frag.index]
            if frag.function.arguments:
                item["arguments"] += frag.function.arguments
                yield ev("response.function_call_arguments.delta", item_id=item["id"],
                         output_index=items.index(item), delta=frag.function.arguments)
    for i, item in enumerate(items):
        item["status"] = "completed"
        if item["type"] == "reasoning":
            yield ev("response.reasoning_text.done", item_id=item["id"], output_index=i,
                     content_index=0, text=item["content"][0]["text"])
        elif item["type"] == "message":
            yield ev("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                     text=item["content"][0]["text"], logprobs=[])
            yield ev("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                     part=item["content"][0])
        else:
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                     arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=i, item=item)
    yield ev("response.completed", response=_response(rid, name, req, items, last))
