"""``dist-engine generate`` (in process) and ``dist-engine client`` (against a server)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dist_engine.cli.flags import add_engine_args, engine_args


def cmd_generate(a: argparse.Namespace) -> int:
    from dist_engine import LLM, SamplingParams

    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                            max_tokens=a.max_tokens)
    llm = LLM(engine_args=engine_args(a))
    try:
        ids = (llm.apply_chat_template([{"role": "user", "content": a.prompt}]) if not a.no_chat
               else list(llm.tokenizer.encode(a.prompt)))
        engine = llm.engine
        engine.validate(ids, params)
        t0 = time.perf_counter()
        engine.add_request("cli", ids, params, a.prompt)
        ttft, final = None, None
        while engine.has_unfinished():
            for out in engine.step():
                c = out.outputs[0]
                if ttft is None and c.token_ids:
                    ttft = time.perf_counter() - t0
                if not a.json and c.text_delta:
                    sys.stdout.write(c.text_delta)
                    sys.stdout.flush()
                final = out
        elapsed = time.perf_counter() - t0
        c = final.outputs[0]
        n = len(c.token_ids)
        decode_s = elapsed - (ttft or 0.0)
        timings = {"time_to_first_token_s": round(ttft or 0.0, 4), "total_s": round(elapsed, 4),
                   "tokens_per_s": round(n / elapsed, 2) if elapsed else 0.0,
                   "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s else 0.0}
        spec = final.metrics.spec if llm.config.speculative else None
        if a.json:
            print(json.dumps({"prompt_token_ids": ids, "token_ids": c.token_ids, "text": c.text,
                              "finish_reason": c.finish_reason, "timings": timings,
                              "speculative": spec.as_dict() if spec else None}))
        else:
            accept = (f", MTP K={llm.config.speculative.num_speculative_tokens}: mean accepted length "
                      f"{spec.mean_accepted_length:.2f}, per position "
                      f"{'/'.join(f'{x:.0%}' for x in spec.per_position)}" if spec else "")
            print(f"\n[{n} tokens, finish={c.finish_reason}, TTFT {timings['time_to_first_token_s']*1000:.0f} ms, "
                  f"{timings['tokens_per_s']:.1f} tok/s overall, {timings['decode_tokens_per_s']:.1f} tok/s decode"
                  f"{accept}]", file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def cmd_client(a: argparse.Namespace) -> int:
    import os

    from dist_engine.client import Client

    kw = dict(max_tokens=a.max_tokens, temperature=a.temperature)
    if a.seed is not None:
        kw["seed"] = a.seed
    api_key = a.api_key or os.environ.get("DIST_ENGINE_API_KEY") or None
    with Client(a.target, api_key=api_key, tls_ca=a.tls_ca) as c:
        req = ({"prompt": a.prompt} if a.no_chat
               else {"messages": [{"role": "user", "content": a.prompt}]})
        for msg in c.generate(timeout=a.timeout, **req, **kw):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.finished:
                print(f"\n[{msg.usage.completion_tokens} tokens, finish={msg.finish_reason}, "
                      f"TTFT {msg.timings.time_to_first_token_s * 1000:.0f} ms]", file=sys.stderr)
    return 0


def register(sub) -> None:
    """The generate and client commands."""
    g = sub.add_parser("generate", help="generate text from one prompt, streamed to the terminal")
    g.add_argument("prompt")
    add_engine_args(g)
    g.add_argument("--no-chat", action="store_true", help="raw completion, no chat template")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(func=cmd_generate)

    cl = sub.add_parser("client", help="send one prompt to a running server and stream the answer")
    cl.add_argument("prompt")
    cl.add_argument("--target", default="127.0.0.1:50051")
    cl.add_argument("--no-chat", action="store_true")
    cl.add_argument("--max-tokens", type=int, default=256)
    cl.add_argument("--temperature", type=float, default=0.0)
    cl.add_argument("--seed", type=int, default=None)
    cl.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    cl.add_argument("--api-key", default=None, help="bearer token (default $DIST_ENGINE_API_KEY)")
    cl.add_argument("--tls-ca", default=None, help="PEM file to trust; enables TLS")
    cl.set_defaults(func=cmd_client)
