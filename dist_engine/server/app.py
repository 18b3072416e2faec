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
from dist_engine.config.sizes import parse_duration, parse_size
from dist_engine.engine.async_llm import AsyncLLM
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.kserve import grpc_service_pb2 as kpb
from dist_engine.kserve import grpc_service_pb2_grpc as kpb_grpc
from dist_engine.server.kserve import KServeServicer
from dist_engine.server.metrics import ServerMetrics
from dist_engine.server.security import BearerAuth, server_credentials
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


async def _set_health(health, status) -> None:
    for name in ("", GENERATION, KSERVE):
        await health.set(name, status)


async def serve(engine_args: EngineArgs, host: str, port: int, served_model_name: str,
                max_queued_requests: int = 256, drain_seconds: float = 30.0,
                metrics_port: int | None = None, api_key: str | None = None,
                tls_cert: str | None = None, tls_key: str | None = None,
                max_message_bytes: int | str = 16 * 2**20) -> None:
    max_message_bytes = parse_size(max_message_bytes, "max_message_bytes")
    drain_seconds = parse_duration(drain_seconds, "drain_seconds")
    if not 0 < max_message_bytes < 2**31:
        raise ValueError(f"--max-message-bytes must be between 1 byte and 2GiB, got {max_message_bytes}")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    creds = server_credentials(tls_cert, tls_key) if tls_cert else None
    llm = AsyncLLM(engine_args=engine_args)
    metrics = ServerMetrics(llm.stats)
    if metrics_port is not None:
        metrics.serve(host, metrics_port)
    server = grpc.aio.server(
        interceptors=[BearerAuth(api_key)] if api_key else None,
        options=[("grpc.max_receive_message_length", min(2 * max_message_bytes, 2**31 - 1)),
                 ("grpc.max_send_message_length", max_message_bytes)])
    pb_grpc.add_GenerationServicer_to_server(
        GenerationServicer(llm, served_model_name, max_queued_requests, metrics, max_message_bytes), server)
    state = {"ready": False}
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeServicer(llm, served_model_name, max_queued_requests,
                       lambda: state["ready"] and not llm.is_dead, metrics, max_message_bytes), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (GENERATION, KSERVE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    addr = f"{host}:{port}"
    bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    if bound == 0:
        raise ValueError(f"cannot listen on {host}:{port}; is the port in use?")
    await server.start()
    try:
        await _warm_up(llm)
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        state["ready"] = True
        print(f"dist-engine serving {served_model_name} on {host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set() and not llm.is_dead:
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        state["ready"] = False
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        if llm.is_dead:
            log.error("the engine died; exiting so an orchestrator restarts the server")
        await server.stop(grace=drain_seconds)
    finally:
        llm.shutdown()
    if llm.is_dead:
        raise SystemExit(3)
