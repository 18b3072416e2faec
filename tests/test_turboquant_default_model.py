"""TurboQuant on the default model (SmolLM2-135M-Instruct): teacher-forced next-token agreement
with the exact fp32 cache over 4 x 256 tokens of English text, a bf16 cache (the noise floor)
and FP8 beside it, and the quantizer's error on the model's real K/V rows against the paper's
bound.

The issue's goals (top-1 agreement >= 98% at 4 bits, >= 95% at 3 bits) are not reachable on this
model at these sizes, and the floors below say what is (bench/turboquant_diagnose.py,
bench/results/turboquant_diagnose.md, the default model's GGUF Q4_1 weights):

- near-ties are not the limit: a bf16 cache agrees 99.9% (KL 4e-5), so the model resolves its
  top token far below 4-bit error;
- the codec is not at fault: on the real rows its relative squared error is the one of random
  unit vectors (0.0088 / 0.033 at 4 / 3 bits, within the bound 0.0106 / 0.0425), no outlier
  channel survives the rotation (largest / median channel RMS 1.3-2.0), and FP8 does not
  saturate (real text's largest |K| / |V| is at most 1.6x calibration's; the scales allow 2x);
- the model needs far less error than 4 bits give: isotropic noise on K and V of relative
  squared error 0.0024 / 0.0006 / 0.00015 (about Lloyd-Max's at 5 / 6 / 7 bits) agrees
  0.925 / 0.963 / 0.979;
  keys of any single layer at 3 bits cost 1-6%. Keys matter most (4 bits: K alone 90.2%, V alone
  95.0%); splitting the same bytes as K5 + V3 gives 88.7% (K4 + V4: 86.9%).

Keys that are shorter than their centred form (mostly the first token's, the attention sink)
are stored uncentred (the sign bit of their scale; layers/tq_cache.py): 0.868 -> 0.904 at 4
bits, 0.776 -> 0.807 at 3, at no cost in bytes. Measured here: bf16 0.999 / KL 4e-5, FP8 0.961
/ 0.0070, turboquant4 0.904 / 0.032, turboquant3 0.807 / 0.120.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_engine import LLM, SamplingParams
from dist_engine.graft.prompts import prompt_sets
from dist_engine.layers import turboquant as tq
from dist_engine.weights.registry import DEFAULT_MODEL, resolve_model
from dist_engine.worker.messages import SeqWork, StepInput

pytestmark = pytest.mark.slow
WINDOWS, WINDOW = 4, 256
FORMATS = ("float32", "bfloat16", "fp8_e4m3", "turboquant4", "turboquant3")
# (top-1 agreement at least, mean KL at most): measured values less a margin; bf16 is the floor
# of the measurement itself (a cache that rounds, far below any 3-8-bit format's error)
FLOORS = {"bfloat16": (0.99, 1e-3), "fp8_e4m3": (0.93, 0.012), "turboquant4": (0.88, 0.04),
          "turboquant3": (0.76, 0.16)}


def english_windows(tokenizer) -> list[list[int]]:
    """4 x 256 tokens of the graft prompts' quoted passages (summaries, reviews, messages)."""
    text = "\n\n".join(prompt_sets()[-1][1])
    ids = tokenizer.encode(text)
    assert len(ids) >= WINDOWS * WINDOW
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]


def run_format(kv_cache_dtype: str, windows) -> dict:
    """Teacher-forced logits ``[4 * 255, vocab]``: the next-token logits after each prefix of
    each window (one prefill per window, so every position attends the cache's stored K/V of the
    ones before it). The exact cache also gives window 1's K/V rows (blocks 1..16 of a fresh
    cache), a TurboQuant cache its calibrated mean keys and rotations."""
    with LLM(DEFAULT_MODEL, kv_cache_dtype=kv_cache_dtype, max_model_len=512, num_kv_blocks=80,
             enable_prefix_caching=False) as llm:
        runner = llm.engine.executor.worker.runner
        outs = llm.generate(prompt_token_ids=windows, sampling_params=SamplingParams(
            temperature=0, max_tokens=1, return_hidden_states=True))
        res = {"logits": torch.cat([runner.model.compute_logits(o.outputs[0].hidden_states)
                                    for o in outs])}
        if kv_cache_dtype == "float32":
            runner.execute(StepInput(step_id=-1, seqs=(SeqWork(
                seq_id=-1, token_ids=tuple(windows[1]), start_pos=0, block_table=tuple(range(1, 17)),
                sample=True),)))
            res["rows"] = [(c.k[16:16 + WINDOW].clone(), c.v[16:16 + WINDOW].clone())
                           for c in runner.kv_caches]
        if kv_cache_dtype == "turboquant4":
            res["means"], res["rots"] = runner.kv_means, [c.rot for c in runner.kv_caches]
        return res


@pytest.fixture(scope="module")
def runs():
    from transformers import AutoTokenizer

    windows = english_windows(AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL)))
    return {fmt: run_format(fmt, windows) for fmt in FORMATS}


def test_teacher_forced_agreement_with_the_fp32_cache(runs):
    exact = runs["float32"]["logits"]
    ref_top, ref_lp = exact.argmax(-1), exact.log_softmax(-1)
    found = {}
    for fmt in FLOORS:
        got = runs[fmt]["logits"]
        agree = (got.argmax(-1) == ref_top).float().mean().item()
        kl = (ref_lp.exp() * (ref_lp - got.log_softmax(-1))).sum(-1).mean().item()
        found[fmt] = (agree, kl)
        print(f"{fmt}: top-1 agreement {agree:.4f}, mean KL {kl:.2g}")
    for fmt, (min_agree, max_kl) in FLOORS.items():
        assert found[fmt][0] >= min_agree and found[fmt][1] <= max_kl, (fmt, found[fmt])
    # more bits, closer: bf16 (16) > FP8 (8) > turboquant4 > turboquant3
    kls = [found[f][1] for f in ("bfloat16", "fp8_e4m3", "turboquant4", "turboquant3")]
    assert kls == sorted(kls) and len(set(kls)) == 4


def test_real_kv_rows_within_the_paper_bound(runs):
    """The model's own K and V rows (exact cache, a 256-token passage) quantized as the cache
    does (keys less the calibrated mean, or as they are where that is shorter): mean squared
    error relative to the stored row's squared norm within (sqrt(3) pi / 2) 4^-b, layer by
    layer."""
    rows, means, rots = runs["float32"]["rows"], runs["turboquant4"]["means"], runs["turboquant4"]["rots"]
    means = means[:len(rows)]  # the main model's 30 layers (the MTP graft's mean follows them)
    assert len(rows) == len(means) == 30 and all(isinstance(m, torch.Tensor) for m in means)
    for bits in (3, 4):
        bound = math.sqrt(3) * math.pi / 2 * 4.0 ** -bits
        spec = tq.TQSpec(bits, 64)
        for layer, ((k, v), mean, rot) in enumerate(zip(rows, means, rots)):
            raw = k.norm(dim=-1, keepdim=True) < (k - mean).norm(dim=-1, keepdim=True)
            for x in (torch.where(raw, k, k - mean), v):  # [256, 3, 64]: what each side stores
                codes, scales = tq.encode(x, rot, spec)
                err = ((tq.dequantize(codes, scales, rot, spec) - x) ** 2).sum(-1) / (x ** 2).sum(-1)
                assert err.mean() <= bound, (bits, layer, err.mean().item())
