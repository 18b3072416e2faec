"""One interceptor in front of every gRPC method: auth, malformed messages, rejection counts.

- Auth: with API keys configured, a call without a known bearer token is UNAUTHENTICATED
  (health stays open for probes).
- A message that does not parse (invalid UTF-8 in a string field, truncated bytes) would make
  grpc answer UNKNOWN with an internal exception name and log a traceback per call. The
  deserializer here never raises: it hands the handler a ``Malformed`` marker, answered with
  INVALID_ARGUMENT and one log line.
- Every call that ends INVALID_ARGUMENT, RESOURCE_EXHAUSTED or UNAUTHENTICATED increments
  ``request_rejected_total{reason}``.
"""

from __future__ import annotations

import logging

import grpc

from dist_engine.server.metrics import ServerMetrics
from dist_engine.server.security import AUTH_HINT, OPEN_PREFIXES, ApiKeys

log = logging.getLogger(__name__)
REJECTED = {grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
            grpc.StatusCode.UNAUTHENTICATED: "unauthenticated"}


class Malformed:
    def __init__(self, error: Exception) -> None:
        self.error = error


class Guard(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys | None, metrics: ServerMetrics | None) -> None:
        self.keys = keys
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        authorized = (self.keys is None or method.startswith(OPEN_PREFIXES) or self.keys.identify(
            dict(details.invocation_metadata or ()).get("authorization")) is not None)
        kw = dict(request_deserializer=_tolerant(handler.request_deserializer, method),
                  response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_in_stream_out(handler.stream_stream, authorized), **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_in_unary_out(handler.stream_unary, authorized), **kw)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_in_stream_out(handler.unary_stream, authorized), **kw)
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(handler.unary_unary, authorized), **kw)

    # ---- checks shared by the four shapes -------------------------------------------------
    async def _refuse(self, request, context, authorized: bool) -> None:
        if not authorized:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_HINT)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the request message does not parse (a string field that is not "
                                "valid UTF-8, or truncated bytes)")

    def _count(self, context) -> None:
        reason = REJECTED.get(context.code())
        if reason is not None and self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()

    async def _requests(self, it, context):
        async for request in it:
            await self._refuse(request, context, True)
            yield request

    def _unary_unary(self, behaviour, authorized):
        async def run(request, context):
            try:
                await self._refuse(request, context, authorized)
                return await behaviour(request, context)
            finally:
                self._count(context)
        return run

    def _unary_in_stream_out(self, behaviour, authorized):
        async def run(request, context):
            try:
                await self._refuse(request, context, authorized)
                async for response in behaviour(request, context):
                    yield response
            finally:
                self._count(context)
        return run

    def _stream_in_unary_out(self, behaviour, authorized):
        async def run(request_iterator, context):
            try:
                await self._refuse(None, context, authorized)
                return await behaviour(self._requests(request_iterator, context), context)
            finally:
                self._count(context)
        return run

    def _stream_in_stream_out(self, behaviour, authorized):
        async def run(request_iterator, context):
            try:
                await self._refuse(None, context, authorized)
                async for response in behaviour(self._requests(request_iterator, context), context):
                    yield response
            finally:
                self._count(context)
        return run


def _tolerant(deserialize, method: str):
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's bad message
            log.warning("%s: a request message did not parse (%s: %s)", method, type(e).__name__, e)
            return Malformed(e)
    return parse
