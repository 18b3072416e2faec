"""What the engine returns: RequestOutput / CompletionOutput, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """Speculative acceptance, per request or engine-wide.

    A verification step with k drafts that accepts a of them emits a + 1 tokens. Mean accepted
    length = 1 + accepted / steps (tokens per verification step, as TensorRT-LLM and vLLM
    report it); position j's acceptance = accepted at j / drafted at j.
    """

    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position
    accepted_at: list[int] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)  # steps by number of accepted drafts

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for lst, n in ((self.drafted_at, num_drafts), (self.accepted_at, num_drafts),
                       (self.histogram, num_accepted + 1)):
            lst.extend([0] * (n - len(lst)))
        for j in range(num_drafts):
            self.drafted_at[j] += 1
        for j in range(num_accepted):
            self.accepted_at[j] += 1
        self.histogram[num_accepted] += 1

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def as_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "per_position": [round(x, 4) for x in self.per_position],
                "drafted_at": list(self.drafted_at), "accepted_at": list(self.accepted_at),
                "histogram": list(self.histogram)}


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
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)

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
    # SamplingParams.return_hidden_states, final output only: torch tensor [P, H], the final-norm
    # hidden state at positions 0..P-1 of prompt + output (P = all tokens but the last)
    hidden_states: object | None = None

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
    # SamplingParams.prompt_logprobs, on the first output after the prefill and the final one:
    # per prompt token {id: logprob} with the token itself and the top-n (None for the first
    # token, which nothing predicts)
    prompt_logprobs: list[dict[int, float] | None] | None = None
