"""What the engine returns: RequestOutput / CompletionOutput, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    prefix_hit_tokens: int = 0  # prompt tokens whose K/V were reused, not computed
    num_preemptions: int = 0
    # seconds between consecutive output tokens (a step that yields k tokens adds k gaps of 1/k)
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean decode time per token after the first (vLLM's TPOT)."""
        n = len(self.inter_token_latencies)
        return sum(self.inter_token_latencies) / n if n else None

    def record_tokens(self, now: float, count: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
            self.inter_token_latencies.extend([0.0] * (count - 1))
        elif count > 0:
            gap = (now - self.last_token_time) / count
            self.inter_token_latencies.extend([gap] * count)
        self.last_token_time = now


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}
    cumulative_logprob: float = 0.0
    # streaming: what was added since the previous RequestOutput of this request
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
