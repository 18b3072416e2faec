"""The sampler on its own: seeded reproducibility, masks, and convergence to the target."""

from __future__ import annotations

import math

import torch

from dist_engine.worker.messages import SamplingSpec
from dist_engine.worker.sampler import apply_masks, apply_penalties, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(spec: SamplingSpec, n: int, logits: torch.Tensor = LOGITS) -> list[int]:
    rows = logits.expand(n, -1).clone()
    return sample(rows, [spec] * n, list(range(n)))[0]  # position i keys the noise of draw i


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    """p-value of Pearson's test (Wilson–Hilferty approximation of the chi-square tail)."""
    n = sum(counts)
    keep = [(c, p) for c, p in zip(counts, probs) if p > 0]
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in keep)
    k = len(keep) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def pooled_chi_square_p(counts, probs) -> float:
    """``chi_square_p`` of token ``counts`` [V] (a tensor) against ``probs`` [V], with the cells
    expected fewer than 5 times pooled into one."""
    big = probs * int(counts.sum()) >= 5
    return chi_square_p(counts[big].tolist() + [int(counts[~big].sum())],
                        probs[big].tolist() + [float(probs[~big].sum())])


def test_greedy_is_argmax_and_seeded_draws_repeat():
    assert draws(SamplingSpec(temperature=0.0), 5) == [0] * 5
    spec = SamplingSpec(temperature=1.0, seed=7)
    assert draws(spec, 50) == draws(spec, 50)
    assert draws(spec, 50) != draws(SamplingSpec(temperature=1.0, seed=8), 50)


def test_empirical_distribution_converges_with_negative_control():
    n = 20000
    spec = SamplingSpec(temperature=0.7, seed=3)
    got = draws(spec, n)
    counts = [got.count(i) for i in range(len(LOGITS))]
    target = torch.softmax(LOGITS / 0.7, -1).tolist()
    assert chi_square_p(counts, target) > 1e-3
    wrong = torch.softmax(LOGITS / 1.0, -1).tolist()  # the untempered distribution must be rejected
    assert chi_square_p(counts, wrong) < 1e-6


def test_draws_of_neighbouring_seeds_and_positions_are_independent():
    """Completions of an ``n > 1`` request use seeds s, s + 1, ...: on a flat distribution over
    V tokens their draws must agree, or sit one token apart, only ~1/V of the time (noise keys
    linear in the seed once gave seed s + 1 seed s's noise shifted by one token). The pairs'
    joint counts pass a chi-square test of independence."""
    V, n = 16, 4000
    flat = torch.zeros(V)
    a = [draws(SamplingSpec(temperature=1.0, seed=s), 1, flat)[0] for s in range(n)]
    b = [draws(SamplingSpec(temperature=1.0, seed=s + 1), 1, flat)[0] for s in range(n)]
    for shift in (0, 1, -1):
        same = sum((x - y) % V == shift % V for x, y in zip(a, b)) / n
        assert abs(same - 1 / V) < 5 * math.sqrt(1 / V / n), (shift, same)
    cells = [0] * (V * V)
    for x, y in zip(a, b):
        cells[x * V + y] += 1
    assert chi_square_p(cells, [1 / V / V] * (V * V)) > 1e-3
    by_pos = sample(flat.expand(n, -1).clone(), [SamplingSpec(temperature=1.0, seed=9)] * n, list(range(n)))[0]
    assert chi_square_p([sum(x == t for x in by_pos) for t in range(V)], [1 / V] * V) > 1e-3
    same_next = sum(x == (y + 1) % V for x, y in zip(by_pos, by_pos[1:])) / (n - 1)
    assert abs(same_next - 1 / V) < 5 * math.sqrt(1 / V / n)


def test_top_k_top_p_min_p_masks_respected():
    assert set(draws(SamplingSpec(temperature=1.5, top_k=2, seed=1), 2000)) == {0, 1}
    # probabilities 0.561, 0.206, 0.125, 0.076, ...; cumulative 0.561, 0.767, 0.892
    got = set(draws(SamplingSpec(temperature=1.0, top_p=0.8, seed=2), 3000))
    assert got == {0, 1, 2}  # 0.767 < 0.8 still needs the third token
    got = set(draws(SamplingSpec(temperature=1.0, top_p=0.75, seed=2), 3000))
    assert got == {0, 1}
    got = set(draws(SamplingSpec(temperature=1.0, min_p=0.2, seed=4), 3000))
    assert got == {0, 1, 2}  # p >= 0.2 * 0.561 = 0.112
    masked = apply_masks(LOGITS, SamplingSpec(temperature=1.0, top_k=3))
    assert torch.isinf(masked[3:]).all() and torch.isfinite(masked[:3]).all()


def test_banned_tokens_never_drawn():
    spec = SamplingSpec(temperature=0.0, banned_token_ids=(0,))
    assert draws(spec, 3) == [1, 1, 1]
    spec = SamplingSpec(temperature=2.0, seed=5, banned_token_ids=(0, 1))
    assert not {0, 1} & set(draws(spec, 2000))


def test_penalties_follow_their_definitions():
    # repetition: positive logits divided, negative multiplied, for prompt and output tokens
    spec = SamplingSpec(temperature=0.0, repetition_penalty=4.0, prompt_ids=(0,),
                        output_counts=((4, 1),))
    row = LOGITS.clone()
    apply_penalties(row, spec)
    assert row.tolist() == [0.5, 1.0, 0.5, 0.0, -4.0, -3.0]
    assert draws(spec, 2) == [1, 1]  # token 0 (2.0 -> 0.5) loses to token 1
    # frequency per occurrence, presence once; output tokens only (the prompt is not penalised)
    spec = SamplingSpec(temperature=0.0, frequency_penalty=0.3, presence_penalty=0.5,
                        prompt_ids=(1,), output_counts=((0, 2), (2, 1)))
    row = LOGITS.clone()
    apply_penalties(row, spec)
    assert torch.allclose(row, torch.tensor([2.0 - 1.1, 1.0, 0.5 - 0.8, 0.0, -1.0, -3.0]))
    assert draws(spec, 2) == [1, 1]
    # a penalised distribution is what gets sampled
    spec = SamplingSpec(temperature=1.0, seed=9, frequency_penalty=1.0, output_counts=((0, 2),))
    got = draws(spec, 20000)
    target = torch.softmax(LOGITS - torch.tensor([2.0, 0, 0, 0, 0, 0]), -1).tolist()
    assert chi_square_p([got.count(i) for i in range(len(LOGITS))], target) > 1e-3
