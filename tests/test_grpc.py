"""The gRPC service on a real server process on loopback: streaming, errors, cancel, health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import hf_greedy
from dist_engine.client import Client

PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, *extra: str, tls_ca: str | None = None, tokenizer: bool = False
                 ) -> tuple[subprocess.Popen, str, int]:
    """A ``dist-engine serve`` process on loopback, once its health says SERVING."""
    from dist_engine.server.security import open_channel

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_engine.cli", "serve", "--model", path, "--port", str(port),
         *([] if tokenizer else ["--no-tokenizer"]), "--max-model-len", "128", "--block-size", "4", "--kv-cache-memory",
         "2MiB", "--max-queued-requests", "8", "--served-model-name", "tiny",
         "--metrics-port", str(metrics_port), *([] if "--http-port" in extra else ["--http-port", "0"]),
         *extra],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    target = f"{'localhost' if tls_ca else '127.0.0.1'}:{port}"
    health = health_pb2_grpc.HealthStub(open_channel(target, tls_ca))
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "server exited during start-up"
        try:
            if health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "server not SERVING within 120 s"
        time.sleep(0.3)
    return proc, target, metrics_port


@pytest.fixture(scope="module")
def server(tiny_models):
    path = tiny_models("llama")
    proc, target, metrics_port = start_server(path, "--max-message-bytes", "64KiB")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    yield target, path, health, metrics_port
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_generate_streams_what_transformers_generates(server):
    target, path, _, _ = server
    expected = hf_greedy(path, PROMPT, 20)
    with Client(target) as c:
        msgs = list(c.generate(token_ids=PROMPT, request_id="abc", temperature=0, max_tokens=20,
                               min_tokens=20))
        assert len(msgs) > 2 and all(m.request_id == "abc" for m in msgs)
        assert [t for m in msgs for t in m.token_ids] == expected
        final = msgs[-1]
        assert final.finished and final.finish_reason == "length"
        assert final.usage.prompt_tokens == len(PROMPT) and final.usage.completion_tokens == 20
        assert final.timings.time_to_first_token_s > 0
        info = c.model_info()
        assert info.served_model_name == "tiny" and info.max_model_len == 128
        assert info.architecture == "LlamaForCausalLM" and info.kv_cache_blocks > 0


def test_bad_input_is_invalid_argument_and_server_keeps_serving(server):
    target, _, health, _ = server
    with Client(target) as c:
        cases = [
            dict(token_ids=[1] * 200, max_tokens=4),  # over max_model_len
            dict(token_ids=[1, 99999], max_tokens=4),  # out of vocabulary
            dict(prompt="text needs a tokenizer", max_tokens=4),
            dict(token_ids=[1, 2], top_p=0.0),  # bad sampling value
            dict(token_ids=[1, 2], temperature=float("nan")),
            dict(token_ids=[1, 2], temperature=-1.0),
            dict(token_ids=[1, 2], stop=[f"s{i}" for i in range(40)]),  # too many stop strings
            dict(token_ids=[1, 2], model="some-other-model"),  # unknown model name
            dict(token_ids=[]),  # empty prompt
            dict(),  # no input
        ]
        for kw in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(c.generate(**kw))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
            assert err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # ~80 KB of token ids, over --max-message-bytes
            list(c.generate(token_ids=[300] * 40000, max_tokens=4))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-message-bytes" in err.value.details()
        ok = list(c.generate(token_ids=PROMPT, temperature=0, max_tokens=3, ignore_eos=True))
        assert ok[-1].finish_reason == "length"
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1


@pytest.fixture(scope="module")
def long_server(tiny_models):
    """A server whose requests may run for 6000 tokens (several seconds even on an idle
    machine), so a cancel or a short deadline always lands while the request still runs."""
    proc, target, _ = start_server(tiny_models("llama1kv_long"), "--max-model-len", "6144",
                                   "--kv-cache-memory", "8MiB")
    yield target
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_cancel_and_deadline_abort_and_free_blocks(long_server):
    long = dict(token_ids=PROMPT, temperature=0, max_tokens=6000, ignore_eos=True)
    with Client(long_server) as c:
        before = c.stats()
        stream = c.generate(**long)
        next(stream)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate(**long, timeout=0.1))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            s = c.stats()
            if s.num_requests_running == 0 and s.kv_cache_usage == 0.0:
                break
            time.sleep(0.1)
        aborted = s.requests_aborted_total - before.requests_aborted_total
        finished = s.requests_finished_total - before.requests_finished_total
        assert s.kv_cache_usage == 0.0 and aborted == 2 and finished == 0, s


def test_prometheus_metrics(server):
    import urllib.request

    target, _, _, metrics_port = server
    with Client(target) as c:
        list(c.generate(token_ids=PROMPT, temperature=0, max_tokens=5, ignore_eos=True))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hits_total", "generation_tokens_total", "request_success_total"):
        assert "dist_engine:" + name in values, name
    assert values["dist_engine:time_to_first_token_seconds_count"] >= 1
    assert values["dist_engine:inter_token_latency_seconds_count"] >= 4
    assert values["dist_engine:generation_tokens_total"] >= 5


def _self_signed(folder) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = str(folder / "cert.pem"), str(folder / "key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


def _https_checks(where: str, cert: str) -> None:
    """The HTTP API on the same server: the same certificate and key, health open."""
    import ssl
    import urllib.error
    import urllib.request

    import openai

    tls = ssl.create_default_context(cafile=cert)
    assert urllib.request.urlopen(f"https://{where}/health", context=tls, timeout=10).status == 200
    with openai.DefaultHttpxClient(verify=tls) as h:
        def client(key: str) -> openai.OpenAI:  # (closing it would close the shared client)
            return openai.OpenAI(base_url=f"https://{where}/v1", api_key=key, http_client=h,
                                 max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client("wrong").models.list()
        r = client("s3cret").completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                                extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port
        urllib.request.urlopen(f"http://{where}/health", timeout=5)


def test_tls_and_bearer_token(tiny_models, tmp_path):
    """TLS with a self-signed certificate plus a bearer token: health stays open for probes,
    every other call needs the token, and plaintext clients cannot connect at all."""
    cert, key = _self_signed(tmp_path)
    http_port = free_port()
    proc, target, _ = start_server(tiny_models("llama"), "--api-key", "s3cret", "--tls-cert", cert,
                                   "--tls-key", key, "--http-port", str(http_port), tls_ca=cert)
    try:
        _https_checks(f"localhost:{http_port}", cert)
        with Client(target, tls_ca=cert) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.model_info()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate(token_ids=PROMPT, max_tokens=4))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, tls_ca=cert, api_key="wrong") as c:
            with pytest.raises(grpc.RpcError) as e:
                c.stats()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, tls_ca=cert, api_key="s3cret") as c:
            msgs = list(c.generate(token_ids=PROMPT, temperature=0, max_tokens=5, ignore_eos=True))
            assert sum(len(m.token_ids) for m in msgs) == 5 and msgs[-1].finished
        with Client(target.replace("localhost", "127.0.0.1"), api_key="s3cret") as c:
            with pytest.raises(grpc.RpcError) as e:  # plaintext against a TLS port
                c.model_info()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_32_concurrent_streams_equal_offline_seeded(server):
    """32 streams at once (more than --max-queued-requests=8 would allow, so in waves of 8):
    each equals the offline API's output for the same seed."""
    import asyncio

    from dist_engine import LLM, SamplingParams
    from dist_engine.client import AsyncClient

    target, path, _, _ = server
    prompts = [PROMPT[: 3 + i % 9] for i in range(32)]
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=[
                SamplingParams(temperature=0.9, seed=i, max_tokens=12, ignore_eos=True) for i in range(32)])]

    async def go():
        client = AsyncClient(target)
        sem = asyncio.Semaphore(8)

        async def one(i):
            async with sem:
                toks = []
                async for m in client.generate(token_ids=prompts[i], temperature=0.9, seed=i,
                                               max_tokens=12, ignore_eos=True):
                    toks.extend(m.token_ids)
                return toks

        out = await asyncio.gather(*(one(i) for i in range(32)))
        await client.close()
        return out

    assert asyncio.run(go()) == expected


def test_queue_overflow_is_resource_exhausted(server):
    """--max-queued-requests=8: a burst of 14 long streams gets RESOURCE_EXHAUSTED for the
    excess, the admitted ones finish, and every block comes back."""
    import asyncio

    from dist_engine.client import AsyncClient

    target = server[0]

    async def go():
        client = AsyncClient(target)

        async def one():
            try:
                n = 0
                async for m in client.generate(token_ids=PROMPT, temperature=0, max_tokens=40,
                                               ignore_eos=True):
                    n += len(m.token_ids)
                return n
            except grpc.aio.AioRpcError as e:
                return e.code()

        out = await asyncio.gather(*(one() for _ in range(14)))
        stats = await client.stats()
        await client.close()
        return out, stats

    out, _ = asyncio.run(go())
    assert out.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert all(x == 40 for x in out if not isinstance(x, grpc.StatusCode))
    with Client(target) as c:
        for _ in range(50):
            if c.stats().kv_cache_usage == 0.0:
                break
            time.sleep(0.1)
        assert c.stats().kv_cache_usage == 0.0


def test_sigterm_drains_in_flight_streams(tiny_models):
    """SIGTERM: health goes NOT_SERVING, new calls are refused, the running stream still
    finishes whole, and the process exits 0."""
    import signal

    proc, target, _ = start_server(tiny_models("llama"), "--drain-seconds", "60")
    with Client(target) as c:
        stream = c.generate(token_ids=PROMPT, temperature=0, max_tokens=80, ignore_eos=True)
        got = list(next(stream).token_ids)
        proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(c.channel)
        for _ in range(50):
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status != 1:
                    break
            except grpc.RpcError:
                break
            time.sleep(0.05)
        for m in stream:
            got.extend(m.token_ids)
            last = m
        assert len(got) == 80 and last.finish_reason == "length"
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate(token_ids=PROMPT, max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.wait(timeout=60) == 0
