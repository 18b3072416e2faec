"""API keys, tenants and their prefix-cache namespaces, TLS, and the matching client channel.

Auth: every call except ``grpc.health.v1`` (Kubernetes probes carry no token) must send
``authorization: Bearer <token>`` with one of the configured keys (``--api-key``, or several in
``--api-key-file``); otherwise it fails with UNAUTHENTICATED (HTTP 401). Each key is a tenant;
``--prefix-cache-isolation`` decides whether tenants share cached prompt blocks. TLS: a PEM
certificate chain and private key; clients pass the CA (or the self-signed cert) to trust.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.",)
AUTH_HINT = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
ISOLATION_MODES = ("none", "salt", "api-key")


class ApiKeys:
    """The accepted bearer tokens. A caller is identified by a short digest of its key (its
    tenant id), never by the key itself, so logs and cache namespaces hold no secrets."""

    def __init__(self, keys: list[str]) -> None:
        keys = [k for k in keys if k]
        if not keys:
            raise ValueError("no API key given (an empty --api-key or key file)")
        self._keys = [(f"Bearer {k}".encode(), hashlib.sha256(k.encode()).hexdigest()[:16])
                      for k in keys]

    @classmethod
    def load(cls, key: str | None, key_file: str | None) -> ApiKeys | None:
        """``--api-key`` and/or ``--api-key-file`` (one key per line, ``#`` comments)."""
        keys = [key] if key else []
        if key_file:
            try:
                with open(key_file) as f:
                    keys += [line.strip() for line in f
                             if line.strip() and not line.lstrip().startswith("#")]
            except OSError as e:
                raise ValueError(f"cannot read --api-key-file: {e}") from None
            if not keys:
                raise ValueError(f"--api-key-file {key_file} holds no key")
        return cls(keys) if keys else None

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, authorization: str | bytes | None) -> str | None:
        """The tenant id of an ``authorization`` header value, or None if no key matches. Every
        key is compared (in constant time each), so timing does not tell which one is close."""
        got = authorization.encode() if isinstance(authorization, str) else (authorization or b"")
        tenant = None
        for expected, tid in self._keys:
            if hmac.compare_digest(got, expected):
                tenant = tid
        return tenant


def default_isolation(keys: ApiKeys | None) -> str:
    """Per API key when several keys (several tenants) are configured, else client salts."""
    return "api-key" if keys is not None and len(keys) > 1 else "salt"


def effective_salt(mode: str, tenant: str | None, client_salt: str | None) -> str | None:
    """The prefix-cache namespace of a request under ``--prefix-cache-isolation``:
    none: everyone shares (client salts ignored); salt: the client's ``cache_salt`` (vLLM's
    behaviour); api-key: the caller's tenant combined with its salt, so no salt a client picks
    can reach another tenant's blocks."""
    if mode == "none":
        return None
    if mode == "salt" or tenant is None:
        return client_salt
    h = hashlib.sha256(b"tenant\x00" + tenant.encode() + b"\x00" + (client_salt or "").encode())
    return "tenant:" + h.hexdigest()


def grpc_authorization(context) -> str:
    return dict(context.invocation_metadata() or ()).get("authorization", "")


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
