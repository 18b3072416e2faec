"""``dist-engine serve``: load the model, warm up, then serve gRPC until SIGTERM/SIGINT.

Optional bearer-token auth (health stays open for probes), TLS and message size limits come from
``server/security.py``. Health (``grpc.health.v1``) reports SERVING only after the model is loaded and one warm-up
generation ran, and NOT_SERVING as soon as draining starts or the engine dies. Server
reflection lists every service. On SIGTERM the server stops taking new calls, lets running
ones finish for ``drain_seconds``, then releases the workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from dist_engine.config import EngineArgs
from dist_engine.engine.async_llm import AsyncLLM
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.kserve import grpc_service_pb2 as kpb
from dist_engine.kserve import grpc_service_pb2_grpc as kpb_grpc
from dist_engine.server.frontend import Frontend
from dist_engine.server.guard import Guard
from dist_engine.server.kserve import KServeServicer
from dist_engine.server.metrics import ServerMetrics
from dist_engine.server.options import ServeOptions
from dist_engine.server.security import server_credentials
from dist_engine.server.servicer import GenerationServicer
from dist_engine.v1 import generation_pb2 as pb
from dist_engine.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
GENERATION = pb.DESCRIPTOR.services_by_name["Generation"].full_name
KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


async def _warm_up(llm: AsyncLLM) -> None:
    token = llm.config.model.bos_token_id
    ids = [token if token is not None and token < llm.config.model.vocab_size else 0]
    async for _ in llm.generate(prompt_token_ids=ids, request_id="warm-up",
                                sampling_params=SamplingParams(temperature=0, max_tokens=2)):
        pass


async def _drain_http(http, task, llm: AsyncLLM, seconds: float) -> None:
    """New HTTP calls get 503 meanwhile; once no request runs (or ``seconds`` passed) uvicorn
    closes its connections."""
    if http is None:
        return
    deadline = asyncio.get_running_loop().time() + seconds
    while llm.num_open_streams and not llm.is_dead and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    http.should_exit = True
    await task


async def _set_health(health, status) -> None:
    for name in ("", GENERATION, KSERVE):
        await health.set(name, status)


async def serve(engine_args: EngineArgs, opts: ServeOptions) -> None:
    keys = opts.api_keys()
    limits = opts.limits(keys)
    creds = server_credentials(opts.tls_cert, opts.tls_key) if opts.tls_cert else None
    llm = AsyncLLM(engine_args=engine_args, chat_template=opts.read_chat_template(),
                   raw_special_tokens=opts.raw_special_tokens)
    metrics = ServerMetrics(llm.stats)
    authorize = (lambda header: keys.identify(header) is not None) if opts.metrics_auth else None
    if opts.metrics_port is not None:
        metrics.serve(opts.host, opts.metrics_port, authorize)
    front = Frontend(llm, opts.served_model_name, limits, metrics)
    state = {"ready": False, "draining": False}
    http = None
    if opts.http_port:
        from dist_engine.server.openai.app import build_app, http_server

        app = build_app(openai_context(llm, front, keys, opts), metrics,
                        lambda: state["ready"] and not llm.is_dead, lambda: state["draining"],
                        opts.max_message_bytes, opts.metrics_auth)
        http = http_server(app, opts.host, opts.http_port, opts.tls_cert, opts.tls_key,
                           opts.drain_seconds)
    log.info("prefix-cache isolation: %s; at most %d sequences in flight, n <= %d",
             limits.isolation, limits.max_queued_seqs, limits.max_n)
    size = opts.max_message_bytes
    server = grpc.aio.server(
        interceptors=[Guard(keys, metrics)],
        options=[("grpc.max_receive_message_length", min(2 * size, 2**31 - 1)),
                 ("grpc.max_send_message_length", size)])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(front, keys, size), server)
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(front, lambda: state["ready"] and not llm.is_dead, keys, size), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (GENERATION, KSERVE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    bound = 0
    if opts.port:
        addr = f"{opts.host}:{opts.port}"
        bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if bound == 0:
            raise ValueError(f"cannot listen on {addr}; is the port in use?")
    await server.start()
    http_task = None
    try:
        if http is not None:
            http_task = asyncio.create_task(http.serve())
            while not http.started:
                if http_task.done():  # the port is taken, say
                    http_task.result()
                    raise ValueError(f"cannot serve HTTP on {opts.host}:{opts.http_port}")
                await asyncio.sleep(0.05)
        await _warm_up(llm)
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        state["ready"] = True
        where = ", ".join(([f"gRPC on {opts.host}:{bound}"] if opts.port else [])
                          + ([f"HTTP on {opts.host}:{opts.http_port}"] if http else []))
        print(f"dist-engine serving {opts.served_model_name}: {where}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set() and not llm.is_dead:
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        state["ready"], state["draining"] = False, True
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        if llm.is_dead:
            log.error("the engine died; exiting so an orchestrator restarts the server")
        await asyncio.gather(server.stop(grace=opts.drain_seconds),
                             _drain_http(http, http_task, llm, opts.drain_seconds))
    finally:
        if http_task is not None and not http_task.done():
            http_task.cancel()
        llm.shutdown()
    if llm.is_dead:
        raise SystemExit(3)


def openai_context(llm: AsyncLLM, front: Frontend, keys, opts: ServeOptions):
    """The HTTP routes' context: the tool template and parsers, from the flags or detected from
    the chat template's own markers (never from the architecture name)."""
    from importlib.resources import files

    from dist_engine.engine.chat import ChatPrompt
    from dist_engine.server.openai.reasoning import get_reasoning_parser
    from dist_engine.server.openai.serving import Context
    from dist_engine.server.openai.tool_parsers import detect, get_parser

    template = llm.chat.template if llm.tokenizer is not None else None
    tool_chat = None
    if template and "tools" not in template and "<|im_start|>" in template:
        # a ChatML template without tool support (the default model's): ours adds it
        shipped = files("dist_engine.assets").joinpath("chat_templates/chatml_tools.jinja").read_text()
        tool_chat = ChatPrompt(llm.tokenizer, shipped, opts.raw_special_tokens)
        log.info("requests with tools use the shipped ChatML tool template")
    parser = opts.tool_call_parser or detect(tool_chat.template if tool_chat else template)
    if parser is not None:
        get_parser(parser)  # an unknown name fails at start-up
    if opts.reasoning_parser is not None:
        get_reasoning_parser(opts.reasoning_parser)
    log.info("tool-call parser: %s (auto tool choice %s); reasoning parser: %s", parser,
             "on" if opts.enable_auto_tool_choice else "off", opts.reasoning_parser)
    return Context(front, keys, parser, opts.enable_auto_tool_choice, opts.reasoning_parser, tool_chat)
