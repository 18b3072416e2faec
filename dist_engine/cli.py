"""``dist-engine`` command line: generate | serve | client | convert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from dist_engine.config import DTYPES, EngineArgs
from dist_engine.config.args import DEFAULT_MODEL
from dist_engine.config.sizes import parse_size
from dist_engine.server.options import DEFAULT_MAX_N, ServeOptions
from dist_engine.server.security import ISOLATION_MODES


def parse_bytes(text: str) -> int:
    try:
        return parse_size(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per ``EngineArgs`` field that has one, with its default and help from there."""
    for f in dataclasses.fields(EngineArgs):
        meta = dict(f.metadata)
        flag = meta.pop("cli_flag", None)
        if flag is None:
            continue
        help_text = meta.pop("help", "")
        if f.type in ("bool", bool):  # store_true flags; --no-X flags store False
            action = "store_false" if flag.startswith("--no-") else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=f.default, help=help_text)
            continue
        kind = parse_bytes if "int | str" in str(f.type) else _scalar_type(f.type)
        shown = "" if f.default is None else " (default: %(default)s)"
        if "choices" not in meta:
            meta["metavar"] = flag[2:].upper().replace("-", "_")
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text + shown, **meta)


def _scalar_type(annotation) -> type:
    """int / float / str from an annotation such as ``"int | None"``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return next((t for t in (int, float) if text.split(" |")[0] == t.__name__), str)


def engine_args(a: argparse.Namespace, **overrides) -> EngineArgs:
    """``EngineArgs`` from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli_flag")}
    return EngineArgs(**{k: v for k, v in vars(a).items() if k in names}, **overrides)


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


def cmd_convert(a: argparse.Namespace) -> int:
    from dist_engine.weights.gguf_convert import convert_gguf

    print(convert_gguf(a.gguf, a.out))
    return 0


def cmd_graft(a: argparse.Namespace) -> int:
    import os

    import torch

    from dist_engine.graft.data import generate_answers, split_answers
    from dist_engine.graft.prompts import split_prompts
    from dist_engine.graft.train import graft
    from dist_engine.weights.registry import resolve_model

    path = resolve_model(a.model)
    train_p, held_p = split_prompts(limit=a.num_prompts)
    answers_file = a.answers or os.path.join(a.out, "answers.jsonl")
    hidden_dir = os.path.join(os.path.dirname(os.path.abspath(answers_file)), "hidden")
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    recs = generate_answers(a.model, train_p + held_p, answers_file,
                            samples_per_prompt=a.samples_per_prompt, max_tokens=a.max_tokens,
                            batch=a.batch, hidden_dir=hidden_dir, device=device)
    (train, train_lens), (held, held_lens) = split_answers(recs, held_p, train_p)
    meta = graft(path, train, held, a.out, epochs=a.epochs, depth=a.depth, lr=a.lr,
                 batch_size=a.batch_size, targets=a.targets, feedback=a.feedback,
                 draft_vocab_size=a.draft_vocab, dtype=a.save_dtype, init_from=a.init,
                 prompt_lens=train_lens + held_lens, hidden_dir=hidden_dir, device=device,
                 time_budget_s=a.time_budget,
                 extra_meta={"samples_per_prompt": a.samples_per_prompt, "max_tokens": a.max_tokens})
    ho = meta["held_out"]
    last = ho[max((k for k in ho if k.startswith("epoch_")), key=lambda k: int(k[6:]))]
    print(f"graft written to {a.out}: held-out accuracy per depth {last['accuracy_per_depth']} "
          f"(untrained {meta['held_out']['untrained']['accuracy_per_depth']}, repeat-last-token "
          f"{last['repeat_last_token_accuracy']}); draft vocabulary covers "
          f"{meta['draft_vocab_coverage']:.1%} of predictions")
    return 0


def cmd_graft_dflash(a: argparse.Namespace) -> int:
    import os

    import torch

    from dist_engine.config import ModelConfig
    from dist_engine.graft.data import generate_answers, split_answers
    from dist_engine.graft.dflash_model import default_target_layers
    from dist_engine.graft.dflash_train import graft_dflash
    from dist_engine.graft.prompts import split_prompts
    from dist_engine.weights.registry import resolve_model

    path = resolve_model(a.model)
    cfg = ModelConfig.from_pretrained(path)
    layers = a.target_layers or default_target_layers(cfg.num_hidden_layers, a.num_target_layers)
    train_p, held_p = split_prompts(limit=a.num_prompts)
    answers_file = a.answers or os.path.join(a.out, "answers.jsonl")
    hidden_dir = os.path.join(os.path.dirname(os.path.abspath(answers_file)), "hidden")
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    recs = generate_answers(a.model, train_p + held_p, answers_file, samples_per_prompt=a.samples_per_prompt,
                            max_tokens=a.max_tokens, batch=a.batch, hidden_dir=hidden_dir, device=device,
                            layers=tuple(layers))
    (train, train_lens), (held, held_lens) = split_answers(recs, held_p, train_p)
    meta = graft_dflash(path, train, held, a.out, prompt_lens=train_lens + held_lens, block_size=a.block_size,
                        num_layers=a.num_layers, target_layer_ids=layers, mask_token_id=a.mask_token_id,
                        gamma=a.loss_decay_gamma, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                        anchors=a.anchors, eval_answers=a.eval_answers, time_budget_s=a.time_budget,
                        draft_vocab_size=a.draft_vocab or None,
                        dtype=a.save_dtype, init_from=a.init, hidden_dir=hidden_dir, device=device,
                        extra_meta={"samples_per_prompt": a.samples_per_prompt, "max_tokens": a.max_tokens})
    ho = meta["held_out"]
    last = ho[max((k for k in ho if k.startswith("epoch_")), key=lambda k: int(k[6:]), default="initial")]
    print(f"DFlash drafter written to {a.out}: held-out accuracy per slot {last['accuracy_per_slot']}, "
          f"mean accepted length for K=1..{a.block_size - 1} {last['mean_accepted_length_per_k']} "
          f"(initialised: {ho['initial']['mean_accepted_length_per_k']}); use it with "
          f"--speculative dflash --speculative-model {a.out}")
    return 0


def cmd_launch(a: argparse.Namespace) -> int:
    from dist_engine.deploy.launch import cmd_launch as launch

    rest = a.serve_args[1:] if a.serve_args[:1] == ["--"] else a.serve_args
    return launch(a, rest)


def cmd_join(a: argparse.Namespace) -> int:
    from dist_engine.deploy.launch import cmd_join as join

    return join(a)


def add_nccl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default=None, help="GPU indices to use, e.g. 0,1 (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--nccl-p2p-off", action="store_true",
                   help="NCCL_P2P_DISABLE=1: cards whose peer-to-peer hangs or fails the all-reduce")
    p.add_argument("--nccl-socket-ifname", default=None,
                   help="NCCL_SOCKET_IFNAME: the network interface ranks talk over")
    p.add_argument("--nccl-no-shm", action="store_true",
                   help="NCCL_SHM_DISABLE=1: containers with a tiny /dev/shm ('Bus error')")
    p.add_argument("--nccl-debug", action="store_true", help="NCCL_DEBUG=INFO")


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from dist_engine.tools.loadgen import main as bench_serve

    server = None
    if a.model:  # the engine the started server runs, for --compare-inprocess
        extra = a.server_args.split() if a.server_args else []
        server = engine_args(build_parser().parse_args(["serve", "--model", a.model, *extra]))
    return bench_serve(a, server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-engine", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="dist_engine's log level")
    sub = parser.add_subparsers(dest="command", required=True)

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

    gm = sub.add_parser("graft-mtp", help="fit an MTP layer to a model by self-distillation")
    gm.add_argument("--model", default=DEFAULT_MODEL)
    gm.add_argument("--out", required=True, help="graft folder (resumes if it holds a checkpoint)")
    gm.add_argument("--answers", default=None, help="answers file (default OUT/answers.jsonl)")
    gm.add_argument("--samples-per-prompt", type=int, default=2,
                    help="answers per prompt: one greedy, the rest sampled at T=0.7")
    gm.add_argument("--max-tokens", type=int, default=192)
    gm.add_argument("--batch", type=int, default=96, help="concurrent generations")
    gm.add_argument("--epochs", type=int, default=8)
    gm.add_argument("--depth", type=int, default=3, help="chained MTP steps trained")
    gm.add_argument("--lr", type=float, default=1e-3)
    gm.add_argument("--batch-size", type=int, default=2,
                    help="answers per optimiser step (small batches: more steps per epoch)")
    gm.add_argument("--targets", choices=("soft", "hard"), default="soft",
                    help="soft: the base's distribution over the draft vocabulary plus its greedy "
                         "token; hard: the greedy token only")
    gm.add_argument("--feedback", choices=("normed", "raw"), default="normed",
                    help="what a chained MTP step feeds the next: its output after "
                         "shared_head.norm, or the raw output")
    gm.add_argument("--draft-vocab", type=int, default=8192,
                    help="draft over this many most frequent predicted tokens")
    gm.add_argument("--save-dtype", choices=DTYPES, default="bfloat16")
    gm.add_argument("--init", default=None, metavar="GRAFT_DIR",
                    help="start from this graft (same base) instead of a copy of the base's last "
                         "layer, e.g. to continue training on more answers")
    gm.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where answers are generated and the layer trained (auto: cuda if present)")
    gm.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop training after this long (evaluation not counted); lr decays over it")
    gm.add_argument("--num-prompts", type=int, default=None,
                    help="answer only the first N prompts of the set (default: all)")
    gm.set_defaults(func=cmd_graft)

    gd = sub.add_parser("graft-dflash", help="train a DFlash block drafter for a model from its own answers")
    gd.add_argument("--model", default=DEFAULT_MODEL)
    gd.add_argument("--out", required=True, help="drafter folder (resumes if it holds a checkpoint)")
    gd.add_argument("--answers", default=None,
                    help="answers file (default OUT/answers.jsonl; graft-mtp can share it)")
    gd.add_argument("--num-prompts", type=int, default=None,
                    help="answer only the first N prompts of the set (default: all)")
    gd.add_argument("--samples-per-prompt", type=int, default=2,
                    help="answers per prompt: one greedy, the rest sampled at T=0.7")
    gd.add_argument("--max-tokens", type=int, default=192)
    gd.add_argument("--batch", type=int, default=96, help="concurrent generations")
    gd.add_argument("--block-size", type=int, default=8, help="tokens per block: the known one and B-1 masks")
    gd.add_argument("--num-layers", type=int, default=2,
                    help="drafter layers (start as copies of the model's first layers)")
    gd.add_argument("--target-layers", type=lambda v: [int(i) for i in v.split(",")], default=None,
                    metavar="I,J,...", help="model layers whose outputs are the drafter's context "
                    "(default: --num-target-layers spread from layer 1 to the fourth-last)")
    gd.add_argument("--num-target-layers", type=int, default=4)
    gd.add_argument("--mask-token-id", type=int, default=None,
                    help="default: the vocabulary id least seen in the answers")
    gd.add_argument("--loss-decay-gamma", type=float, default=None,
                    help="slot k's loss weight exp(-(k-1)/gamma) (default 4 for blocks of 8, 7 for 16)")
    gd.add_argument("--epochs", type=int, default=2)
    gd.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop training after this long (evaluation not counted); lr decays over it")
    gd.add_argument("--lr", type=float, default=6e-4)
    gd.add_argument("--batch-size", type=int, default=4, help="answers per optimiser step")
    gd.add_argument("--anchors", type=int, default=32, help="random blocks per answer and step")
    gd.add_argument("--eval-answers", type=int, default=64, help="held-out answers scored after each epoch")
    gd.add_argument("--draft-vocab", type=int, default=8192,
                    help="train and draft over this many most frequent predicted tokens (0: all)")
    gd.add_argument("--save-dtype", choices=DTYPES, default="bfloat16")
    gd.add_argument("--init", default=None, metavar="DRAFTER_DIR",
                    help="continue from a drafter this command wrote for the same model")
    gd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where answers are generated and the drafter trained (auto: cuda if present)")
    gd.set_defaults(func=cmd_graft_dflash)

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

    c = sub.add_parser("convert", help="convert a Llama-family GGUF file to an HF-format folder")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dist_engine").setLevel(args.log_level.upper())
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
