"""``ServeOptions``: the server's own settings (ports, keys, TLS, limits), apart from the engine's
(``EngineArgs``). ``dist-engine serve`` builds one from its flags."""

from __future__ import annotations

from dataclasses import dataclass

from dist_engine.config.sizes import parse_duration, parse_size
from dist_engine.server.security import ISOLATION_MODES, ApiKeys, default_isolation

DEFAULT_MAX_N = 16


@dataclass(frozen=True)
class ServerLimits:
    max_queued_seqs: int = 256  # --max-queued-requests: sequences in flight (n counts)
    max_n: int = DEFAULT_MAX_N
    isolation: str = "salt"  # --prefix-cache-isolation

    def __post_init__(self) -> None:
        if self.max_queued_seqs < 1:
            raise ValueError(f"--max-queued-requests must be >= 1, got {self.max_queued_seqs}")
        if not 1 <= self.max_n <= self.max_queued_seqs:
            raise ValueError(f"--max-n must be in [1, --max-queued-requests={self.max_queued_seqs}], "
                             f"got {self.max_n}")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"--prefix-cache-isolation must be one of {ISOLATION_MODES}, "
                             f"got {self.isolation!r}")


@dataclass(frozen=True)
class ServeOptions:
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 turns it off
    http_port: int = 8000  # OpenAI-compatible HTTP; 0 turns it off
    metrics_port: int | None = None
    max_queued_requests: int = 256  # sequences in flight (a request counts its n)
    max_n: int = DEFAULT_MAX_N
    drain_seconds: float | str = 30.0
    api_key: str | None = None
    api_key_file: str | None = None
    metrics_auth: bool = False
    prefix_cache_isolation: str | None = None  # None: per key with several keys, else salt
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int | str = 16 * 2**20
    chat_template: str | None = None  # a Jinja file replacing the model's template
    raw_special_tokens: bool = False
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_message_bytes",
                           parse_size(self.max_message_bytes, "max_message_bytes"))
        object.__setattr__(self, "drain_seconds", parse_duration(self.drain_seconds, "drain_seconds"))
        if not 0 < self.max_message_bytes < 2**31:
            raise ValueError("--max-message-bytes must be between 1 byte and 2GiB, got "
                             f"{self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if not self.port and not self.http_port:
            raise ValueError("--port 0 and --http-port 0 leave nothing to serve")
        if self.metrics_auth and not (self.api_key or self.api_key_file):
            raise ValueError("--metrics-auth needs --api-key or --api-key-file")

    def api_keys(self) -> ApiKeys | None:
        return ApiKeys.load(self.api_key, self.api_key_file)

    def limits(self, keys: ApiKeys | None) -> ServerLimits:
        # a request of more than the queue's places could never be admitted
        return ServerLimits(max_queued_seqs=self.max_queued_requests,
                            max_n=min(self.max_n, self.max_queued_requests),
                            isolation=self.prefix_cache_isolation or default_isolation(keys))

    def read_chat_template(self) -> str | None:
        if self.chat_template is None:
            return None
        try:
            with open(self.chat_template) as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"cannot read --chat-template: {e}") from None
