"""Python clients for the Generation service: ``Client`` (blocking) and ``AsyncClient``.

    with Client("127.0.0.1:50051") as c:
        for msg in c.generate("Hello", max_tokens=32, temperature=0):
            print(msg.text, end="")

Sampling keywords are the fields of ``SamplingOptions`` (temperature, top_p, max_tokens, seed,
stop, ...). Errors arrive as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from dist_engine.server.security import auth_metadata, open_channel
from dist_engine.v1 import generation_pb2 as pb
from dist_engine.v1 import generation_pb2_grpc as pb_grpc


def build_request(prompt: str | None = None, *, token_ids: list[int] | None = None,
                  messages: list[dict] | None = None, request_id: str = "", model: str = "",
                  cache_salt: str = "", **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, model=model, cache_salt=cache_salt,
                             sampling=pb.SamplingOptions(**sampling))
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif messages is not None:
        req.chat.messages.extend(pb.ChatMessage(**m) for m in messages)
    return req


class Client:
    """``api_key``: the server's bearer token; ``tls_ca``: PEM file to trust (enables TLS)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.channel = open_channel(target, tls_ca)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.md = auth_metadata(api_key)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **kw) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, **kw), timeout=timeout, metadata=self.md)

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text), metadata=self.md).token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.md)

    def stats(self) -> pb.ServerStats:
        return self.stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self.md)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.channel = open_channel(target, tls_ca, aio=True)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.md = auth_metadata(api_key)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kw) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self.stub.Generate(build_request(prompt, **kw), timeout=timeout,
                                            metadata=self.md):
            yield msg

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.md)

    async def stats(self) -> pb.ServerStats:
        return await self.stub.GetServerStats(pb.GetServerStatsRequest(), metadata=self.md)

    async def close(self) -> None:
        await self.channel.close()
