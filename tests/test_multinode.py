"""Multi-node Ray on one machine: a head and a second node started with `ray start` (each with
its own resources), the engine joining that cluster with --ray-address and placing one rank per
node (STRICT_SPREAD). Generation matches TP=1; losing a node's worker mid-generation makes a
server fail its streams with UNAVAILABLE, turn NOT_SERVING and exit non-zero, within seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import psutil
import pytest
from test_grpc import free_port

from dist_engine import LLM, SamplingParams
from dist_engine.worker.ray_executor import PING_TIMEOUT_S

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROMPT = [1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """`ray start --head` plus a second `ray start` joining it; both stopped afterwards."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DIST_ENGINE_TEST_CLUSTER": tag}
    temp = str(tmp_path_factory.mktemp("ray"))
    port = free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(["ray", "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                    "--temp-dir", temp, "--include-dashboard", "false", "--resources",
                    '{"node_a": 1}', *common],
                   env=env, check=True, capture_output=True)
    subprocess.run(["ray", "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                    "--resources", '{"node_b": 1}', *common],
                   env=env, check=True, capture_output=True)
    yield f"127.0.0.1:{port}", tag, env
    # `ray stop` would stop every Ray on the machine (the test session's too): kill only the
    # processes of this cluster, which all carry its tag in their environment
    for p in psutil.process_iter(["environ"]):
        if (p.info["environ"] or {}).get("DIST_ENGINE_TEST_CLUSTER") == tag:
            try:
                p.kill()
            except psutil.Error:
                pass


RUN = """
import json, sys, ray
from dist_engine import LLM, SamplingParams
from dist_engine.worker.ray_executor import PING_TIMEOUT_S
llm = LLM(sys.argv[1], tensor_parallel_size=2, ray_address=sys.argv[2], placement_strategy="STRICT_SPREAD",
          skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4)
out = llm.generate(prompt_token_ids=[json.loads(sys.argv[3])],
                   sampling_params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
nodes = {n for n in ray.get([w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                             for w in llm.engine.executor.workers])}
print(json.dumps({"tokens": out[0].outputs[0].token_ids, "nodes": len(nodes)}))
llm.shutdown()
"""


def test_tp2_across_two_ray_nodes_matches_single_rank(tiny_models, two_node_cluster):
    address, _, env = two_node_cluster
    path = tiny_models("llama")
    with LLM(path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64, block_size=4) as llm:
        expected = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    # shm all-reduce works across "nodes" on one host too; the point is placement and rendezvous
    out = subprocess.run([sys.executable, "-c", RUN, path, address, json.dumps(PROMPT)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["nodes"] == 2  # one rank per Ray node
    assert r["tokens"] == expected


def test_lost_worker_fails_streams_and_exits(tiny_models, two_node_cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dist_engine.client import Client
    from dist_engine.server.frontend import ENGINE_UNAVAILABLE

    address, tag, env = two_node_cluster
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_engine.cli", "serve", "--model", tiny_models("llama"),
         "--port", str(port), "--http-port", "0", "--no-tokenizer", "--tp", "2", "--ray-address", address,
         "--placement-strategy", "STRICT_SPREAD", "--max-model-len", "512", "--block-size", "4",
         "--kv-cache-memory", "4MiB"], env=env)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            deadline = time.monotonic() + 180
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
            # a deadline far past the engine's own detection (an actor death at once, a silent
            # rank after PING_TIMEOUT_S): a hang would end in DEADLINE_EXCEEDED, not UNAVAILABLE
            stream = c.generate(token_ids=PROMPT, temperature=0, max_tokens=400, ignore_eos=True,
                                timeout=PING_TIMEOUT_S + 60)
            next(stream)
            victims = [p for p in psutil.process_iter(["cmdline", "environ"])
                       if "ShardWorker" in " ".join(p.info["cmdline"] or [])
                       and (p.info["environ"] or {}).get("DIST_ENGINE_TEST_CLUSTER") == tag]
            assert len(victims) == 2
            t0 = time.monotonic()
            victims[1].send_signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == ENGINE_UNAVAILABLE  # no actor ids, pids or addresses
            print(f"lost worker detected after {time.monotonic() - t0:.1f} s")
        assert proc.wait(timeout=30) != 0  # exits so an orchestrator restarts it
    finally:
        if proc.poll() is None:
            proc.kill()
