"""KServe v2 / Triton GRPCInferenceService: an unmodified tritonclient[grpc] (in its own
virtualenv, since it needs protobuf < 7) against a real server process on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dist_engine import LLM, SamplingParams
from dist_engine.server.kserve import decode_bytes, encode_bytes, read_inputs, request_params
from dist_engine.weights.registry import DEFAULT_MODEL, cache_dir

PROMPT = "The capital of France is"
HERE = os.path.dirname(__file__)


def test_bytes_tensor_codec_and_bad_inputs():
    from dist_engine.kserve import grpc_service_pb2 as kpb

    items = [b"hello", b"", "héllo".encode()]
    assert decode_bytes(encode_bytes(items)) == items
    with pytest.raises(ValueError, match="truncated"):
        decode_bytes(b"\x05\x00")
    req = kpb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(encode_bytes([b"hi"]))
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(encode_bytes([b'{"temperature": "0.5", "max_tokens": 7}']))
    prompt, params, stream, exclude = request_params(read_inputs(req))
    assert (prompt, params.temperature, params.max_tokens, stream, exclude) == ("hi", 0.5, 7, False, False)
    for bad, msg in (('{"temprature": 1}', "unknown sampling parameter"), ("[1]", "JSON object"),
                     ('{"top_p": 7}', "top_p"), ("{", "not JSON")):
        req.raw_input_contents[1] = encode_bytes([bad.encode()])
        with pytest.raises(ValueError, match=msg):
            request_params(read_inputs(req))


@pytest.fixture(scope="module")
def triton_python():
    """A cached virtualenv with tritonclient[grpc] (fetched from PyPI once, ~30 s)."""
    venv = os.path.join(cache_dir(), "venvs", "tritonclient-2.73")
    py = os.path.join(venv, "bin", "python")
    if not os.path.isfile(os.path.join(venv, ".complete")):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "tritonclient[grpc]==2.73.0"], check=True)
        open(os.path.join(venv, ".complete"), "w").close()
    return py


@pytest.mark.slow
def test_tritonclient_streams_through_model_stream_infer(triton_python):
    from test_grpc import start_server

    with LLM(DEFAULT_MODEL, max_model_len=256, num_kv_blocks=32) as llm:
        ids = llm.tokenizer.encode(PROMPT)
        expected = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
            temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    proc, target, _ = start_server(DEFAULT_MODEL, "--speculative", "none", "--kv-cache-memory",
                                   "64MiB", tokenizer=True)
    try:
        out = subprocess.run([triton_python, os.path.join(HERE, "triton_client_check.py"), target,
                              "tiny", PROMPT], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    assert (r["live"], r["ready"], r["model_ready"], r["other_model_ready"]) == (True, True, True, False)
    assert r["inputs"][0] == "text_input" and r["decoupled"] is True
    assert len(r["stream_chunks"]) > 1  # streamed in pieces...
    assert "".join(r["stream_chunks"]) == expected  # ...that add up to the offline output
    assert len(r["stream_errors"]) == 1 and "temperature" in r["stream_errors"][0]
    assert r["unary_text"] == PROMPT + expected  # unary echoes the prompt, like vLLM's backend
    assert r["unknown_model_error"] == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.slow
def test_bench_serve_soak_cancels_without_errors_or_leaks(tmp_path):
    """The load generator's closed-loop soak against a real server: half the requests cancelled
    mid-stream, none failing, and every KV block back once the load drains."""
    from test_grpc import start_server

    proc, target, _ = start_server(DEFAULT_MODEL, "--speculative", "none", "--kv-cache-memory",
                                   "64MiB", tokenizer=True)
    try:
        out = subprocess.run([sys.executable, "-m", "dist_engine.cli", "bench-serve", "--target", target,
                              "--closed-loop", "4", "--duration", "8", "--max-tokens", "10",
                              "--cancel-fraction", "0.5", "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    row = json.load(open(tmp_path / "bench_serve.json"))["rows"][0]
    assert row["errors"] == 0 and row["cancelled"] > 0 and row["ok"] > 0
    assert row["kv_usage_after_drain"] == 0.0
    assert (tmp_path / "bench_serve.md").read_text().startswith("| load |")
