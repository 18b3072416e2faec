"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), in the gRPC server's process and over
its ``AsyncLLM``: thin routes over ``completions.py``, ``chat.py`` and ``responses.py``.

``/v1/*``, ``/tokenize`` and ``/detokenize`` need the API key when one is configured;
``/health``, ``/version`` and (unless ``--metrics-auth``) ``/metrics`` do not. Bodies over
``--max-message-bytes`` get 413 before they are read whole.
"""

from __future__ import annotations

import contextlib
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dist_engine.server.openai import chat, completions, errors, responses
from dist_engine.server.openai.errors import APIError
from dist_engine.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from dist_engine.server.openai.responses import ResponsesRequest
from dist_engine.server.openai.serving import Context


def tenant(request: Request) -> str | None:
    """The caller's tenant id (None without keys); 401 for a missing or unknown key."""
    keys = request.app.state.ctx.keys
    if keys is None:
        return None
    who = keys.identify(request.headers.get("authorization"))
    if who is None:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    return who


Tenant = Annotated["str | None", Depends(tenant)]


def build_app(ctx: Context, metrics, ready, draining, max_body_bytes: int,
              metrics_auth: bool) -> FastAPI:
    """``ready()``: loaded, warmed up and not draining (``/health`` answers 503 otherwise);
    ``draining()``: SIGTERM came, so new API calls get 503 while running ones finish."""
    app = FastAPI(title="dist_engine OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    errors.install(app, metrics)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Gate, draining=draining)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if ready() else 503)

    @app.get("/version")
    async def version():
        from dist_engine import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus(request: Request):
        if metrics_auth:
            tenant(request)  # 401 without a key
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(_: Tenant):
        card = ModelCard(id=ctx.front.name, max_model_len=ctx.llm.config.scheduler.max_model_len)
        return ModelList(data=[card])

    @app.get("/v1/models/{model}")
    async def model(model: str, _: Tenant):
        ctx.check_model(model)
        return ModelCard(id=model, max_model_len=ctx.llm.config.scheduler.max_model_len)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request, who: Tenant):
        return await completions.create(ctx, req, raw, who)

    @app.post("/v1/chat/completions")
    async def create_chat(req: ChatCompletionRequest, raw: Request, who: Tenant):
        return await chat.create(ctx, req, raw, who)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, raw: Request, who: Tenant):
        return await responses.create(ctx, req, raw, who)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, _: Tenant):
        ctx.check_model(req.model)
        messages = [chat.message_dict(m) for m in req.messages] if req.messages else None
        ids = await ctx.llm.encode_async(
            req.prompt, None, messages,
            **({"add_generation_prompt": req.add_generation_prompt} if messages else {}))
        return {"tokens": ids, "count": len(ids),
                "max_model_len": ctx.llm.config.scheduler.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, _: Tenant):
        ctx.check_model(req.model)
        vocab = ctx.llm.config.model.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if ctx.llm.tokenizer is None:
            raise ValueError("this server has no tokenizer (--no-tokenizer)")
        return {"prompt": ctx.llm.tokenizer.decode(req.tokens)}

    return app


class Gate:
    """503 for new API calls once the server drains (probes and metrics still answer)."""

    def __init__(self, app, draining) -> None:
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.draining() and scope["path"] not in OPEN_PATHS:
            body = errors.error_body(503, "the server is shutting down; retry on another replica")
            return await JSONResponse(body, status_code=503)(scope, receive, send)
        return await self.app(scope, receive, send)


OPEN_PATHS = ("/health", "/metrics", "/version")


class BodyLimit:
    """413 for a request body over ``limit`` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, self._message())
            return message
        try:
            await self.app(scope, limited, send)
        except APIError:
            await self._too_large(send)

    def _message(self) -> str:
        return (f"the request body is over this server's limit of {self.limit} bytes "
                "(--max-message-bytes)")

    async def _too_large(self, send) -> None:
        body = JSONResponse(errors.error_body(413, self._message()), status_code=413)
        await body({"type": "http"}, None, send)


class HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: ``dist-engine serve`` owns SIGTERM and drains
    gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_server(app: FastAPI, host: str, port: int, tls_cert: str | None, tls_key: str | None,
                drain_seconds: float) -> HttpServer:
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            timeout_graceful_shutdown=int(drain_seconds) or 1, log_level="warning",
                            access_log=False, lifespan="off")
    return HttpServer(config)
