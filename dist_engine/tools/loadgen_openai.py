"""``bench-serve --protocol openai``: the same requests over the OpenAI-compatible HTTP API
(streamed chat completions through the official ``openai`` client), timed by the same
``Result.chunk`` as gRPC streams. Chunks carry their token ids (``return_token_ids``), so token
counts and time per output token are exact, as over gRPC."""

from __future__ import annotations

import asyncio
import time

from tqdm import tqdm

from dist_engine.tools.loadgen import Result, one, one_inprocess, pct, tpot


class OpenAIClient:
    """An ``AsyncOpenAI`` client for ``base_url`` (http://HOST:PORT) and the server's gRPC
    ``stats`` (the KV usage after a load drains), when a gRPC target is known."""

    def __init__(self, base_url: str, api_key: str | None, grpc_client=None) -> None:
        import openai

        self.http = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "none",
                                       max_retries=0)
        self.grpc = grpc_client

    async def stats(self):
        return await self.grpc.stats()

    async def model_info(self):
        return await self.grpc.model_info()

    async def close(self) -> None:
        await self.http.close()


async def one_openai(client: OpenAIClient, messages, max_tokens: int, cancel_after: int | None,
                     timeout: float) -> Result:
    import openai

    r = Result()
    try:
        stream = await client.http.chat.completions.create(
            model="", messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
            timeout=timeout, extra_body={"return_token_ids": True})
        async for chunk in stream:
            for choice in chunk.choices:
                r.chunk(len((choice.model_extra or {}).get("token_ids") or ()))
            if cancel_after is not None and r.tokens >= cancel_after:
                await stream.close()
                r.outcome = "cancelled"
                break
    except openai.APIStatusError as e:
        r.outcome = f"error:{e.status_code}"
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        r.outcome = f"error:{type(e).__name__}"
    except asyncio.CancelledError:
        r.outcome = "cancelled"
    r.latency = time.perf_counter() - r.start
    return r


async def paired_three_way(grpc_client, http: OpenAIClient, llm, prompts, max_tokens: int,
                           n: int) -> dict:
    """In-process, gRPC and HTTP batch-1 requests in turn, ``n`` rounds (same prompt per
    round, order rotated each round); overheads are medians of the per-round TPOT ratios."""
    msgs0 = [{"role": "user", "content": prompts[0]}]
    await one_inprocess(llm, msgs0, 4)  # warm every path
    await one(grpc_client, msgs0, 4, None, 600)
    await one_openai(http, msgs0, 4, None, 600)
    runs = {"inprocess": [], "grpc": [], "http": []}
    for i in tqdm(range(n), desc="batch 1 rounds", leave=False):
        msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
        paths = {"inprocess": lambda m=msgs: one_inprocess(llm, m, max_tokens),
                 "grpc": lambda m=msgs: one(grpc_client, m, max_tokens, None, 600),
                 "http": lambda m=msgs: one_openai(http, m, max_tokens, None, 600)}
        order = list(paths)[i % 3:] + list(paths)[:i % 3]
        got = {name: tpot(await paths[name]()) for name in order}
        if all(got.values()):
            for name, value in got.items():
                runs[name].append(value)
    ratio = lambda a, b: pct([x / y for x, y in zip(runs[a], runs[b])], 50) - 1  # noqa: E731
    return {**{f"{k}_tpot_p50_ms": pct(v, 50) * 1000 for k, v in runs.items()},
            "grpc_overhead": ratio("grpc", "inprocess"), "http_overhead": ratio("http", "inprocess"),
            "http_vs_grpc": ratio("http", "grpc"), "rounds": len(runs["http"])}
