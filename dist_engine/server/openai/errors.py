"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status codes OpenAI's clients map to exception classes: 400 bad request, 401 no or wrong key,
404 unknown model or route, 413 body too large, 429 queue full, 503 engine dead or draining."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dist_engine.engine.async_llm import QueueFullError
from dist_engine.server.frontend import public_error
from dist_engine.worker.executor import EngineDeadError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable_error"}
REASONS = {400: "invalid_argument", 401: "unauthenticated", 413: "invalid_argument",
           422: "invalid_argument", 429: "resource_exhausted"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class UnknownModel(APIError):
    def __init__(self, model: str, served: str) -> None:
        super().__init__(404, f"the model {model!r} does not exist; this server serves {served!r}",
                         "model", "model_not_found")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def as_api_error(e: BaseException) -> APIError:
    """The API error for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, QueueFullError):
        return APIError(429, f"{e} (--max-queued-requests counts each of a request's n)")
    if isinstance(e, EngineDeadError):
        return APIError(503, public_error(e))
    raise e


def install(app, metrics) -> None:
    """Exception handlers mapping everything a route raises to the OpenAI error shape, and
    counting refusals in ``request_rejected_total{reason}``."""

    def respond(err: APIError) -> JSONResponse:
        if metrics is not None and err.status in REASONS:
            metrics.rejected.labels(reason=REASONS[err.status]).inc()
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(error_body(err.status, err.message, err.param, err.code),
                            status_code=err.status, headers=headers)

    async def api_error(_: Request, e: Exception) -> JSONResponse:
        return respond(as_api_error(e))

    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return respond(APIError(400, f"{where}: {msg}" if where else msg, where or None))

    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return respond(APIError(e.status_code, str(e.detail)))

    for cls in (APIError, ValueError, QueueFullError, EngineDeadError):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
