"""How many drafts to ask for, from recent acceptance (engine-wide, pure bookkeeping).

The j-th draft of a step adds a token only when it and every draft before it are accepted, so
it is worth P(first j accepted) tokens, while it costs one more chained MTP step and one more
verified row whether accepted or not. ``DraftDepth`` keeps an exponential average of that
probability per draft position, over the steps that drafted the position, and asks for the
leading positions whose average is at least ``min_acceptance``. Positions it stops drafting get
no new evidence, so every ``probe_every``-th step drafts all K again. Output never depends on
the depth (verification is exact), only the speed does.

The average is slow (``alpha`` 0.03: about the last 30 verifications) and probes come every 8th
step: with a faster average (0.1) a position accepted 20% of the time fell under a 0.1 bar after
a short run of misses and then stayed off for dozens of steps between probes. Simulated with the
benchmark's per-position acceptance (greedy 59/29/20%, T=0.7 43/16/7%) and a draft position
costing 9% of a step, the depth now reaches 99.8% / 98.6% of the best fixed K's speed, against
96.5% / 97.6% before.
"""

from __future__ import annotations


class DraftDepth:
    def __init__(self, k: int, min_acceptance: float, alpha: float = 0.03, probe_every: int = 8,
                 prior: float = 0.5) -> None:
        if k < 1 or not 0.0 <= min_acceptance < 1.0 or not 0.0 < alpha <= 1.0 or probe_every < 1:
            raise ValueError(f"bad DraftDepth settings: k={k}, min_acceptance={min_acceptance}, "
                             f"alpha={alpha}, probe_every={probe_every}")
        self.k, self.min_acceptance, self.alpha, self.probe_every = k, min_acceptance, alpha, probe_every
        self.rate = [prior] * k  # per position: recent P(this draft and all before it accepted)
        self.num_calls = 0

    def limit(self) -> int:
        """Drafts per sequence for the next step (call once per step)."""
        self.num_calls += 1
        if self.min_acceptance == 0.0 or self.num_calls % self.probe_every == 0:
            return self.k
        n = 0
        while n < self.k and self.rate[n] >= self.min_acceptance:
            n += 1
        return n

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's verification: ``num_accepted`` of its ``num_drafts`` drafts taken."""
        for j in range(min(num_drafts, self.k)):
            self.rate[j] += self.alpha * (float(j < num_accepted) - self.rate[j])
