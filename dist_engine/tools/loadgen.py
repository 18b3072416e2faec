"""``dist-engine bench-serve``: a gRPC load generator for the Generation service.

Requests arrive as a Poisson process at each offered rate (requests/s; ``inf`` sends them all at
once) with chat prompts from the graft prompt set. Per request it records time to first token,
time per output token, inter-token latencies, tokens and the outcome; per rate it reports
p50/p90/p99 of each, request and token throughput, errors, and the server's KV usage once the
load has drained (anything above zero is a leaked block). ``--cancel-fraction`` cancels that
share of requests after a random number of tokens; ``--closed-loop N`` keeps N streams open for
``--duration`` seconds instead (the soak test). With ``--model`` it starts its own server, and
``--compare-inprocess`` also loads the model in this process and alternates batch-1 requests
between the in-process API and gRPC, measuring time per output token the same way on both sides
(client-observed), so the gRPC overhead is one paired ratio that machine drift does not bias.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from dist_engine.client import build_request
from dist_engine.config import EngineArgs


@dataclass
class Result:
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    first_chunk: int = 0  # tokens in the first chunk (more than one with speculation)
    last_token: float = 0.0  # seconds from the start to the last token
    latency: float = 0.0
    outcome: str = "ok"  # ok | cancelled | error:<CODE>
    start: float = field(default_factory=time.perf_counter)

    def chunk(self, k: int) -> None:
        """``k`` tokens arrived now: TTFT, inter-token latencies and the last-token time."""
        if not k:
            return
        now = time.perf_counter() - self.start
        if self.ttft is None:
            self.ttft, self.first_chunk = now, k
            self.itl.extend([0.0] * (k - 1))
        else:
            self.itl.extend([(now - self.last_token) / k] * k)
        self.tokens += k
        self.last_token = now


def tpot(r: Result) -> float | None:
    """Time per output token after the first chunk: (last token - first token) / later tokens."""
    later = r.tokens - r.first_chunk
    return (r.last_token - r.ttft) / later if r.ttft is not None and later > 0 else None


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q / 100 * len(xs))) - 1)]


async def one(client, messages, max_tokens: int, cancel_after: int | None, timeout: float) -> Result:
    """One streamed request over gRPC, or over HTTP for an ``OpenAIClient``."""
    if hasattr(client, "http"):
        from dist_engine.tools.loadgen_openai import one_openai

        return await one_openai(client, messages, max_tokens, cancel_after, timeout)
    r = Result()
    call = None
    try:
        req = build_request(messages=messages, max_tokens=max_tokens, temperature=0.0)
        call = client.stub.Generate(req, timeout=timeout, metadata=client.md)
        async for msg in call:
            r.chunk(len(msg.token_ids))
            if cancel_after is not None and r.tokens >= cancel_after:
                call.cancel()
                r.outcome = "cancelled"
                break
    except grpc.aio.AioRpcError as e:
        r.outcome = "cancelled" if e.code() == grpc.StatusCode.CANCELLED else f"error:{e.code().name}"
    except asyncio.CancelledError:
        r.outcome = "cancelled"
    r.latency = time.perf_counter() - r.start
    return r


async def run_rate(client, prompts, rate: float, num: int, max_tokens: int, cancel_fraction: float,
                   seed: int, timeout: float, duration: float | None) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    tasks = []
    bar = tqdm(total=num if duration is None else None, desc=f"rate {rate:g}/s", unit="req", leave=False)
    t0 = time.perf_counter()
    i = 0
    while (duration is None and i < num) or (duration is not None and time.perf_counter() - t0 < duration):
        msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
        cancel = rng.randrange(1, max_tokens) if rng.random() < cancel_fraction else None
        t = asyncio.create_task(one(client, msgs, max_tokens, cancel, timeout))
        t.add_done_callback(lambda _: bar.update(1))
        tasks.append(t)
        i += 1
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    bar.close()
    return results, time.perf_counter() - t0


async def run_closed(client, prompts, streams: int, duration: float, max_tokens: int,
                     cancel_fraction: float, seed: int, timeout: float) -> tuple[list[Result], float]:
    """``streams`` clients, each sending its next request as soon as the last one ends, until
    ``duration`` seconds have passed; a ``cancel_fraction`` share is cancelled part-way."""
    rng = random.Random(seed)
    results: list[Result] = []
    bar = tqdm(total=round(duration), desc=f"{streams} streams", leave=False,
               bar_format="{desc}: {bar} {n}/{total} s {postfix}")
    t0 = time.perf_counter()
    counter = iter(range(10**9))

    async def worker():
        while time.perf_counter() - t0 < duration:
            i = next(counter)
            cancel = rng.randrange(1, max_tokens) if rng.random() < cancel_fraction else None
            msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
            results.append(await one(client, msgs, max_tokens, cancel, timeout))
            bar.n = min(round(duration), round(time.perf_counter() - t0))
            bar.set_postfix(requests=len(results), refresh=True)

    await asyncio.gather(*(worker() for _ in range(streams)))
    bar.close()
    return results, time.perf_counter() - t0


async def abuse(client, kind: str, max_model_len: int, stop: asyncio.Event) -> dict:
    """One client sending maximum-size prompts back to back until ``stop``: ``huge`` is a text
    just under the 16 MiB message limit (the server must refuse it without stalling others),
    ``max`` a prompt of max_model_len - 1 token ids (accepted; its prefill shares the steps)."""
    sent, codes = 0, {}
    if kind == "huge":
        req = build_request("lorem ipsum dolor sit amet " * 560_000, max_tokens=1)
    else:
        req = build_request(token_ids=[random.Random(sent).randrange(100, 30000)
                                       for _ in range(max_model_len - 1)], max_tokens=1)
    while not stop.is_set():
        try:
            async for _ in client.stub.Generate(req, timeout=600, metadata=client.md):
                pass
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        codes[code] = codes.get(code, 0) + 1
        sent += 1
    return {"abuse": kind, "abusive_requests": sent, "abusive_outcomes": codes}


def summarize(label: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.outcome == "ok"]
    itl = [x for r in ok for x in r.itl]
    tpots = [t for t in map(tpot, ok) if t is not None]
    row = {"load": label, "requests": len(results), "ok": len(ok),
           "cancelled": sum(r.outcome == "cancelled" for r in results),
           "errors": sum(r.outcome.startswith("error") for r in results),
           "error_codes": sorted({r.outcome for r in results if r.outcome.startswith("error")}),
           "req_per_s": len(ok) / wall, "tok_per_s": sum(r.tokens for r in results) / wall}
    for name, xs in (("ttft", [r.ttft for r in ok if r.ttft is not None]), ("tpot", tpots),
                     ("itl", itl), ("latency", [r.latency for r in ok])):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = pct(xs, q) * 1000
    return row


async def leaked_blocks(client, settle_s: float = 10.0) -> float:
    """KV usage once nothing runs (0.0 means every block came back)."""
    deadline = time.monotonic() + settle_s
    while True:
        s = await client.stats()
        if (s.num_requests_running == 0 and s.kv_cache_usage == 0.0) or time.monotonic() > deadline:
            return s.kv_cache_usage
        await asyncio.sleep(0.2)


def svg_plot(rows: list[dict], path: str) -> None:
    """Latency (TTFT and TPOT p50/p99) against achieved throughput, as a small SVG."""
    W, H, M = 640, 360, 50
    xs = [r["req_per_s"] for r in rows]
    series = [("ttft_p50_ms", "#1f77b4"), ("ttft_p99_ms", "#aec7e8"), ("tpot_p50_ms", "#d62728"),
              ("tpot_p99_ms", "#ff9896")]
    ys = [r[k] for r in rows for k, _ in series if not math.isnan(r[k])]
    xmax, ymax = max(xs + [1e-9]) * 1.1, max(ys + [1e-9]) * 1.1

    def pt(x, y):
        return M + x / xmax * (W - 2 * M), H - M - y / ymax * (H - 2 * M)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
             f'<line x1="{M}" y1="{H - M}" x2="{W - M}" y2="{H - M}" stroke="black"/>',
             f'<line x1="{M}" y1="{M}" x2="{M}" y2="{H - M}" stroke="black"/>',
             f'<text x="{W / 2 - 60}" y="{H - 12}">throughput (requests/s)</text>',
             f'<text x="8" y="{M - 10}">latency (ms), max {ymax:.0f}</text>']
    for i, (key, color) in enumerate(series):
        pts = [pt(x, r[key]) for x, r in zip(xs, rows) if not math.isnan(r[key])]
        parts.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
            color, " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)))
        parts.append(f'<text x="{W - M - 90}" y="{M + 14 * i}" fill="{color}">{key}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def inprocess_engine(args: EngineArgs):
    """The same engine the server runs, in this process (KV capped at 1 GiB unless given)."""
    from dist_engine.engine.async_llm import AsyncLLM

    if args.kv_cache_memory is None:
        args = dataclasses.replace(args, kv_cache_memory=2**30)
    return AsyncLLM(engine_args=args)


async def one_inprocess(llm, messages, max_tokens: int) -> Result:
    """One request through AsyncLLM, timed by the same ``Result.chunk`` as a gRPC stream."""
    from dist_engine.engine.sampling_params import SamplingParams

    r = Result()
    async for o in llm.generate(messages=messages, sampling_params=SamplingParams(temperature=0, max_tokens=max_tokens)):
        r.chunk(len(o.outputs[0].token_ids_delta))
    r.latency = time.perf_counter() - r.start
    return r


async def paired_batch1(client, llm, prompts, max_tokens: int, n: int) -> dict:
    """Alternate one in-process and one gRPC request ``n`` times (same prompt per pair); the
    overhead is the median of the per-pair TPOT ratios."""
    await one_inprocess(llm, [{"role": "user", "content": prompts[0]}], 4)  # warm both paths
    await one(client, [{"role": "user", "content": prompts[0]}], 4, None, 600)
    local, remote, ratios = [], [], []
    for i in tqdm(range(n), desc="batch 1 pairs", leave=False):
        msgs = [{"role": "user", "content": prompts[i % len(prompts)]}]
        a = tpot(await one_inprocess(llm, msgs, max_tokens))
        b = tpot(await one(client, msgs, max_tokens, None, 600))
        if a and b:
            local.append(a)
            remote.append(b)
            ratios.append(b / a)
    return {"inprocess_tpot_p50_ms": pct(local, 50) * 1000, "grpc_tpot_p50_ms": pct(remote, 50) * 1000,
            "grpc_overhead": pct(ratios, 50) - 1, "pairs": len(ratios),
            "grpc_overhead_per_pair": [x - 1 for x in ratios]}


def start_server(model: str, port: int, extra: list[str], http_port: int = 0) -> subprocess.Popen:
    from dist_engine.client import Client

    http = [] if "--http-port" in extra else ["--http-port", str(http_port)]
    proc = subprocess.Popen([sys.executable, "-m", "dist_engine.cli", "serve", "--model", model,
                             "--port", str(port), *http, *extra])
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with Client(f"127.0.0.1:{port}") as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc
            except grpc.RpcError:
                time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become SERVING within 300 s")


def main(a, server_args: EngineArgs | None = None) -> int:
    """``server_args``: the engine the started server runs (``--model`` with ``--server-args``),
    for the in-process side of ``--compare-inprocess``."""
    from dist_engine.client import AsyncClient
    from dist_engine.graft.prompts import graft_prompts

    prompts = graft_prompts()
    rates = [float(x) for x in a.rates.split(",")]
    extra = a.server_args.split() if a.server_args else []
    report = {"config": {k: v for k, v in vars(a).items() if k != "func"}}
    if a.compare_inprocess and not a.model:
        raise ValueError("--compare-inprocess needs --model (the bench then starts the server)")
    proc = None
    target, http_target = a.target, a.http_target
    if a.model:
        from dist_engine.worker.shard_worker import free_port_and_ip

        port, http_port = free_port_and_ip()[1], free_port_and_ip()[1]
        proc = start_server(a.model, port, extra, http_port if a.protocol == "openai" else 0)
        target, http_target = f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    rows = []
    try:
        async def go():
            grpc_client = AsyncClient(target, api_key=a.api_key, tls_ca=a.tls_ca)
            client = grpc_client
            if a.protocol == "openai":
                from dist_engine.tools.loadgen_openai import OpenAIClient, paired_three_way

                client = OpenAIClient(http_target, a.api_key, grpc_client)
            if a.compare_inprocess:
                llm = inprocess_engine(server_args)
                try:
                    if a.protocol == "openai":
                        report.update(await paired_three_way(grpc_client, client, llm, prompts,
                                                             a.max_tokens, a.batch1_requests))
                    else:
                        report.update(await paired_batch1(client, llm, prompts, a.max_tokens,
                                                          a.batch1_requests))
                finally:
                    llm.shutdown()
                print(f"batch 1 TPOT p50: in-process {report['inprocess_tpot_p50_ms']:.1f} ms, gRPC "
                      f"{report['grpc_tpot_p50_ms']:.1f} ms; paired overhead {report['grpc_overhead']:+.1%}"
                      + (f"; HTTP {report['http_tpot_p50_ms']:.1f} ms, paired overhead "
                         f"{report['http_overhead']:+.1%} (vs gRPC {report['http_vs_grpc']:+.1%})"
                         if "http_overhead" in report else ""), flush=True)
            loads = ([(f"closed {a.closed_loop}", None)] if a.closed_loop else
                     [(f"{r:g}/s", r) for r in rates])
            if a.abuse:  # each load again beside one abusive client
                loads += [(f"{label} + {a.abuse} prompts", rate) for label, rate in loads]
            max_len = (await client.model_info()).max_model_len
            for label, rate in loads:
                stop = asyncio.Event()
                abuser = (asyncio.create_task(abuse(AsyncClient(target, api_key=a.api_key,
                                                                tls_ca=a.tls_ca), a.abuse, max_len, stop))
                          if label.endswith(" prompts") else None)
                if rate is None:
                    results, wall = await run_closed(client, prompts, a.closed_loop, a.duration or 60.0,
                                                     a.max_tokens, a.cancel_fraction, a.seed, a.timeout)
                else:
                    results, wall = await run_rate(client, prompts, rate, a.requests, a.max_tokens,
                                                   a.cancel_fraction, a.seed, a.timeout, a.duration)
                row = summarize(label, results, wall)
                if abuser is not None:
                    stop.set()
                    row.update(await abuser)
                    row["ttft_p99_ratio_vs_clean"] = row["ttft_p99_ms"] / rows[0]["ttft_p99_ms"]
                row["kv_usage_after_drain"] = await leaked_blocks(client)
                rows.append(row)
                print(f"{label}: {row['ok']} ok, {row['cancelled']} cancelled, {row['errors']} errors; "
                      f"{row['tok_per_s']:.1f} tok/s; TTFT p50 {row['ttft_p50_ms']:.0f} ms; TPOT p50 "
                      f"{row['tpot_p50_ms']:.0f} ms; KV after drain {row['kv_usage_after_drain']:.3f}",
                      flush=True)
            await client.close()
            if client is not grpc_client:
                await grpc_client.close()

        asyncio.run(go())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    report["rows"] = rows
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_serve.json"), "w") as f:
        json.dump(report, f, indent=2)
    head = ("| load | ok | cancelled | errors | req/s | tok/s | TTFT p50/p90/p99 ms | "
            "TPOT p50/p90/p99 ms | ITL p50/p99 ms | KV used after drain |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['load']} | {r['ok']} | {r['cancelled']} | {r['errors']} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.0f} / {r['tpot_p90_ms']:.0f} / {r['tpot_p99_ms']:.0f} | "
                     f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | {r['kv_usage_after_drain']:.3f} |")
    text = "\n".join(lines)
    for r in rows:
        if "abuse" in r:
            text += (f"\n\n{r['load']}: the abusive client sent {r['abusive_requests']} requests "
                     f"({', '.join(f'{k} {v}' for k, v in sorted(r['abusive_outcomes'].items()))}).")
    if "http_overhead" in report:
        text += (f"\n\nBatch 1 TPOT p50 over {report['rounds']} rounds (in-process, gRPC, HTTP in "
                 f"turn): in-process {report['inprocess_tpot_p50_ms']:.1f} ms, gRPC "
                 f"{report['grpc_tpot_p50_ms']:.1f} ms, HTTP {report['http_tpot_p50_ms']:.1f} ms; median "
                 f"paired overhead gRPC {report['grpc_overhead']:+.1%}, HTTP {report['http_overhead']:+.1%}"
                 f" (HTTP vs gRPC {report['http_vs_grpc']:+.1%}).")
    elif "grpc_overhead" in report:
        text += (f"\n\nBatch 1 TPOT p50 over {report['pairs']} alternating pairs: in-process "
                 f"{report['inprocess_tpot_p50_ms']:.1f} ms, over gRPC {report['grpc_tpot_p50_ms']:.1f} ms; "
                 f"median paired overhead {report['grpc_overhead']:+.1%}.")
    with open(os.path.join(a.out, "bench_serve.md"), "w") as f:
        f.write(text + "\n")
    if rows:
        svg_plot(rows, os.path.join(a.out, "bench_serve.svg"))
    print(text)
    return 1 if any(r["errors"] for r in rows) else 0
