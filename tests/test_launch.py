"""The workstation launcher on a CPU-only machine (how CI exercises it): preflight numbers, a
Ray head of its own, `serve` at TP=2 on it, and a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_grpc import free_port

from dist_engine.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_preflight_reports_numbers(tiny_models):
    out = subprocess.run([sys.executable, "-m", "dist_engine.cli", "launch", "--model",
                          tiny_models("llama"), "--tp", "2", "--device", "cpu", "--preflight-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all-reduce of 1 MiB across 2 ranks (gloo)" in out.stdout
    assert "/dev/shm" in out.stdout and "KV cache about" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dist_engine.cli", "launch", "--model",
                          tiny_models("llama"), "--tp", "2", "--device", "cuda", "--preflight-only"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "FAIL" in bad.stdout  # no GPUs here: said, not crashed


def test_launch_serves_at_tp2_and_stops_cleanly(tiny_models):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_engine.cli", "launch", "--model", tiny_models("llama"), "--tp", "2",
         "--device", "cpu", "--ray-port", str(free_port()), "--", "--port", str(port),
         "--no-tokenizer", "--max-model-len", "128", "--kv-cache-memory", "2MiB", "--block-size", "4"])
    try:
        with Client(f"127.0.0.1:{port}") as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, "launch exited early"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.5)
            msgs = list(c.generate(token_ids=[1, 17, 230, 45], temperature=0, max_tokens=6,
                                   ignore_eos=True))
            assert sum(len(m.token_ids) for m in msgs) == 6
            assert c.model_info().tensor_parallel_size == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
