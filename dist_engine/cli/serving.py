"""``dist-engine serve | launch | join | bench-serve``: the server, a workstation launcher,
joining a Ray cluster, and the gRPC load generator."""

from __future__ import annotations

import argparse

from dist_engine.cli.flags import add_engine_args, add_nccl_args, engine_args, parse_bytes
from dist_engine.config.args import DEFAULT_MODEL
from dist_engine.server.options import DEFAULT_MAX_N, ServeOptions
from dist_engine.server.security import ISOLATION_MODES


def cmd_serve(a: argparse.Namespace) -> int:
    import asyncio
    import os

    from dist_engine.server.app import serve

    kw = engine_args(a, skip_tokenizer_init=a.no_tokenizer)
    opts = ServeOptions(
        served_model_name=a.served_model_name or os.path.basename(os.path.normpath(a.model)),
        host=a.host, port=a.port, metrics_port=a.metrics_port,
        max_queued_requests=a.max_queued_requests, max_n=a.max_n, drain_seconds=a.drain_seconds,
        api_key=a.api_key or os.environ.get("DIST_ENGINE_API_KEY") or None,
        api_key_file=a.api_key_file, metrics_auth=a.metrics_auth,
        prefix_cache_isolation=a.prefix_cache_isolation, tls_cert=a.tls_cert, tls_key=a.tls_key,
        max_message_bytes=a.max_message_bytes, raw_special_tokens=a.raw_special_tokens,
        http_port=a.http_port, chat_template=a.chat_template, tool_call_parser=a.tool_call_parser,
        enable_auto_tool_choice=a.enable_auto_tool_choice, reasoning_parser=a.reasoning_parser)
    asyncio.run(serve(kw, opts))
    return 0


def cmd_launch(a: argparse.Namespace) -> int:
    from dist_engine.deploy.launch import cmd_launch as launch

    rest = a.serve_args[1:] if a.serve_args[:1] == ["--"] else a.serve_args
    return launch(a, rest)


def cmd_join(a: argparse.Namespace) -> int:
    from dist_engine.deploy.launch import cmd_join as join

    return join(a)


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from dist_engine.cli import build_parser
    from dist_engine.tools.loadgen import main as bench_serve

    server = None
    if a.model:  # the engine the started server runs, for --compare-inprocess
        extra = a.server_args.split() if a.server_args else []
        server = engine_args(build_parser().parse_args(["serve", "--model", a.model, *extra]))
    return bench_serve(a, server)


def register(sub) -> None:
    """The serving commands."""
    s = sub.add_parser("serve", help="serve the gRPC Generation API (+ health, reflection)")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=ServeOptions.port, help="gRPC port (0: no gRPC)")
    s.add_argument("--http-port", type=int, default=ServeOptions.http_port,
                   help="OpenAI-compatible HTTP API at /v1 (0: no HTTP)")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file used instead of the model's")
    s.add_argument("--tool-call-parser", default=None,
                   help="how tool calls are read from answers: hermes, llama3_json, mistral, "
                        "deepseek_v3, deepseek_v31 (default: from the chat template's markers)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto")')
    s.add_argument("--reasoning-parser", default=None,
                   help="split <think> reasoning into reasoning_content: deepseek_r1, qwen3")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    s.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences in flight (a request counts its n, from before it is "
                        "tokenized) before new ones get RESOURCE_EXHAUSTED / HTTP 429")
    s.add_argument("--max-n", type=int, default=DEFAULT_MAX_N,
                   help="most completions (n) one request may ask for")
    s.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long running requests may finish")
    s.add_argument("--no-tokenizer", action="store_true", help="token-id input only")
    s.add_argument("--api-key", default=None,
                   help="require 'authorization: Bearer KEY' on every call but health "
                        "(default: $DIST_ENGINE_API_KEY; none: no auth)")
    s.add_argument("--api-key-file", default=None,
                   help="several keys, one per line (# comments); each key is a tenant")
    s.add_argument("--metrics-auth", action="store_true",
                   help="/metrics also requires an API key")
    s.add_argument("--prefix-cache-isolation", choices=ISOLATION_MODES, default=None,
                   help="who shares cached prompt blocks: none (everyone), salt (requests with "
                        "the same cache_salt), api-key (each key's callers, per salt); default: "
                        "api-key with several keys, else salt")
    s.add_argument("--raw-special-tokens", action="store_true",
                   help="trusted callers only: special-token text in chat content becomes "
                        "control tokens (by default it stays text, so no turn can be forged)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    s.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    s.add_argument("--max-message-bytes", type=parse_bytes, default=16 * 2**20,
                   help="largest request/response message (default 16MiB); a larger request "
                        "gets INVALID_ARGUMENT (beyond twice this, grpc's RESOURCE_EXHAUSTED)")
    s.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="gRPC load generator: Poisson arrivals at several rates")
    bs.add_argument("--target", default="127.0.0.1:50051", help="a running server's gRPC address")
    bs.add_argument("--protocol", choices=("grpc", "openai"), default="grpc",
                    help="send the load over gRPC, or as streamed chat completions over the "
                         "OpenAI-compatible HTTP API (with --compare-inprocess: in-process, gRPC "
                         "and HTTP batch-1 requests in turn)")
    bs.add_argument("--http-target", default="http://127.0.0.1:8000",
                    help="a running server's HTTP API (--protocol openai)")
    bs.add_argument("--model", default=None, help="start a server for this model instead")
    bs.add_argument("--server-args", default="", help="extra `serve` flags when --model is given")
    bs.add_argument("--rates", default="0.5,1,2,inf", help="offered requests/s (inf: all at once)")
    bs.add_argument("--requests", type=int, default=32, help="requests per rate")
    bs.add_argument("--duration", type=float, default=None,
                    help="seconds per rate instead of a request count; with --closed-loop the "
                         "soak length (default 60)")
    bs.add_argument("--closed-loop", type=int, default=None, metavar="N",
                    help="keep N streams open (each sends its next request when one ends) for "
                         "--duration seconds instead of the Poisson rates")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--cancel-fraction", type=float, default=0.0,
                    help="cancel this share of requests after a random number of tokens")
    bs.add_argument("--abuse", choices=("huge", "max"), default=None,
                    help="run each load again beside one client sending maximum-size prompts in "
                         "a loop: huge (15 MB texts the server refuses) or max (max_model_len "
                         "token ids)")
    bs.add_argument("--compare-inprocess", action="store_true",
                    help="first alternate batch-1 requests in-process and over gRPC, reporting "
                         "the paired TPOT overhead (needs --model)")
    bs.add_argument("--batch1-requests", type=int, default=10, help="pairs for --compare-inprocess")
    bs.add_argument("--timeout", type=float, default=600.0, help="per-request deadline (s)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--tls-ca", default=None)
    bs.add_argument("--out", default="bench/results", help="folder for JSON, Markdown and SVG")
    bs.set_defaults(func=cmd_bench_serve)

    la = sub.add_parser("launch", help="workstation: preflight, start Ray, serve (args after -- go to serve)")
    la.add_argument("--model", default=DEFAULT_MODEL)
    la.add_argument("--tp", type=int, default=1)
    la.add_argument("--cp", type=int, default=1, help="context-parallel ranks (world = TP x CP)")
    la.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    la.add_argument("--kv-cache-memory", type=parse_bytes, default=None)
    la.add_argument("--memory-fraction", type=float, default=0.5)
    la.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a head")
    la.add_argument("--ray-port", type=int, default=6379)
    la.add_argument("--preflight-only", action="store_true", help="check and report, start nothing")
    la.add_argument("--force", action="store_true", help="start even if a preflight check fails")
    add_nccl_args(la)
    la.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `dist-engine serve` flags")
    la.set_defaults(func=cmd_launch)

    jo = sub.add_parser("join", help="add this machine to a running Ray cluster (ray start)")
    jo.add_argument("--address", required=True, help="the head, HOST:6379")
    jo.add_argument("--num-gpus", type=int, default=None)
    jo.add_argument("--block", action="store_true", help="stay in the foreground")
    add_nccl_args(jo)
    jo.set_defaults(func=cmd_join)
