"""Expert-cache counters: one rank's (sent back with each step), the world's (merged by the
executor), and the process's resident memory as Linux splits it (heap vs mapped files)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ExpertCacheStats:
    """Cumulative since start-up (start-up's own passes excluded). A lookup is one expert needed
    by one layer in one step on one rank: a hit if it was resident or already loading (a
    prefetch), a miss if the step had to start its load."""

    budget_bytes: int = 0  # per rank
    num_slots: int = 0  # per rank
    expert_bytes: int = 0  # one expert in the cache (its layer's format)
    num_experts: int = 0  # routed experts paged, all ranks
    resident_bytes: int = 0  # slots holding an expert, all ranks
    hits: int = 0
    misses: int = 0
    prefetches: int = 0  # loads started ahead by the next layer's router
    prefetch_hits: int = 0  # ...that a layer then used
    evictions: int = 0
    bytes_read: int = 0  # read from the source (file or pinned host memory)
    tokens: int = 0  # tokens through the model (the same on every rank)
    wait_s: float = 0.0  # time layers waited for loads (the largest rank's)
    rss_anon_bytes: int = 0  # the largest worker's heap (the budget bounds its expert part)
    rss_file_bytes: int = 0  # the largest worker's mapped file pages

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": round(self.hit_rate, 4),
                "bytes_per_token": round(self.bytes_per_token, 1)}

    @staticmethod
    def merge(ranks: list[ExpertCacheStats]) -> ExpertCacheStats:
        """The world's stats from each rank's: counts and resident bytes add up (each rank pages
        its own experts); per-rank sizes, tokens, waits and memory take the largest."""
        per_rank = {"budget_bytes", "num_slots", "expert_bytes", "tokens", "wait_s", "rss_anon_bytes",
                    "rss_file_bytes"}
        return ExpertCacheStats(**{
            f.name: (max if f.name in per_rank else sum)(getattr(r, f.name) for r in ranks)
            for f in fields(ExpertCacheStats)})


def process_rss() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in bytes, from /proc (0, 0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    except OSError:
        return 0, 0
    return kb.get("RssAnon", 0) * 1024, kb.get("RssFile", 0) * 1024
