"""Text handling with the default model's real tokenizer: UTF-8 streaming, stop strings, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_engine.engine.detokenizer import IncrementalDetokenizer
from dist_engine.engine.outputs import RequestMetrics
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.engine.sequence import Sequence
from dist_engine.engine.stopping import append_tokens
from dist_engine.weights.registry import DEFAULT_MODEL, resolve_model
from dist_engine.worker.messages import SampledTokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def _seq(tokenizer, params: SamplingParams) -> Sequence:
    prompt = tokenizer.encode("Say:")
    return Sequence(0, "r", 0, prompt, params, 0, IncrementalDetokenizer(tokenizer, prompt),
                    RequestMetrics(0.0))


def _feed(seq: Sequence, ids: list[int]) -> list[str]:
    deltas = []
    for t in ids:
        append_tokens(seq, SampledTokens((t,), (0.0,)), frozenset({2}), 0.0)
        deltas.append(seq.take_text_delta())
        if seq.finished:
            break
    return deltas


def test_utf8_streaming_never_emits_broken_characters(tokenizer):
    text = " héllo 世界 🚀 naïve café ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    seq = _seq(tokenizer, SamplingParams(max_tokens=100))
    deltas = _feed(seq, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_across_token_boundaries_is_not_emitted(tokenizer):
    text = " The answer is forty-two. Done."
    ids = tokenizer.encode(text)
    stop = "y-tw"  # starts inside one token, ends inside another
    seq = _seq(tokenizer, SamplingParams(max_tokens=100, stop=[stop]))
    deltas = _feed(seq, ids)
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert "".join(deltas) == " The answer is fort" == seq.text
    assert len(seq.output_token_ids) < len(ids)


def test_cli_generate_json_and_streaming():
    cmd = [sys.executable, "-m", "dist_engine.cli", "generate", "Write a haiku about GPUs",
           "--max-tokens", "12", "--max-model-len", "256"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) <= 12 and result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["timings"]["tokens_per_s"] > 0
    streamed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert streamed.stdout.strip() == result["text"].strip()  # greedy: the same text
    assert "tok/s" in streamed.stderr
