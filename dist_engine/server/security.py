"""Optional bearer-token auth and TLS for the gRPC server, and the matching client channel.

Auth: every call except ``grpc.health.v1`` (Kubernetes probes carry no token) must send the
metadata ``authorization: Bearer <token>``; otherwise it fails with UNAUTHENTICATED. TLS: a PEM
certificate chain and private key; clients pass the CA (or the self-signed cert) to trust.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.",)
AUTH_HINT = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"


async def _deny_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_HINT)


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_HINT)
    yield  # pragma: no cover - makes this an async generator


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the API token is empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return handler
        kw = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_stream, **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny_unary, **kw)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny_stream, **kw)
        return grpc.unary_unary_rpc_method_handler(_deny_unary, **kw)


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    try:
        with open(cert_file, "rb") as f:
            cert = f.read()
        with open(key_file, "rb") as f:
            key = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the TLS certificate or key: {e}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def open_channel(target: str, tls_ca: str | None = None, aio: bool = False,
                 options: list | None = None):
    """An insecure channel, or a TLS one trusting ``tls_ca`` (a PEM file)."""
    mod = grpc.aio if aio else grpc
    if tls_ca is None:
        return mod.insecure_channel(target, options=options)
    with open(tls_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return mod.secure_channel(target, creds, options=options)


def check_request_size(request, limit: int | None) -> None:
    """ValueError (sent as INVALID_ARGUMENT) for a request over ``--max-message-bytes``. The
    transport accepts up to twice the limit, so such a request reaches this check and gets an
    actionable message; beyond that grpc itself refuses it with RESOURCE_EXHAUSTED."""
    if limit is not None and (size := request.ByteSize()) > limit:
        raise ValueError(f"the request is {size} bytes, over this server's limit of {limit} bytes "
                         "(--max-message-bytes); send a shorter prompt or raise the limit")
