"""Speculative decoding settings (``SpeculativeConfig``): the method and its drafter."""

from __future__ import annotations

from dataclasses import dataclass

from dist_engine.config.model import DTYPES

CONCAT_ORDERS = ("emb_hidden", "hidden_emb")
STAGES = ("normed", "raw")
DRAFT_DTYPES = ("auto", *DTYPES, "int8", "int4")
ACCEPTANCE = ("rejection", "gumbel")
# what proposes the drafts: the model's MTP layers or a graft of one; a Gemma 4 assistant
# drafter (transformers' gemma4_assistant) reading the target's K/V; a DFlash block-diffusion
# drafter (a whole block of drafts per forward)
METHODS = ("mtp", "gemma4_assistant", "dflash")
MAX_TOKENS = {"mtp": 8, "gemma4_assistant": 8, "dflash": 63}  # K; dflash: up to its block size - 1
# vLLM's per-family names of the MTP method (it maps them all to "mtp" too)
MTP_ALIASES = ("deepseek_mtp", "mimo_mtp", "qwen3_next_mtp", "glm4_moe_mtp", "ernie_mtp")
# drafts per step of MTP at most (sizes what DeepSeek-V4's compressors keep for a verification)
MAX_SPECULATIVE_TOKENS = MAX_TOKENS["mtp"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding.

    ``method``: ``mtp`` (the names vLLM gives per family, such as ``deepseek_mtp``, mean it too)
    ``gemma4_assistant`` or ``dflash``. ``model``: for ``mtp`` a folder holding a grafted MTP layer
    (``mtp_config.json`` + ``mtp.safetensors``, written by ``dist-engine graft-mtp``), None for
    the checkpoint's own MTP layers; for the others the drafter's checkpoint. The three
    per-model settings: ``concat_order`` of ``eh_proj``'s input (DeepSeek/GLM put the embedding
    first, MiMo the hidden state), ``hidden_stage`` of the main model's hidden state that feeds
    the first draft step (after or before the final norm), and ``feedback``: what a chained
    step feeds the next (the MTP block's output after ``shared_head.norm``, or before).
    """

    method: str = "mtp"
    num_speculative_tokens: int = 1
    model: str | None = None
    concat_order: str = "emb_hidden"
    hidden_stage: str = "normed"
    feedback: str = "normed"
    # Draft over only the first ``draft_vocab_size`` ids of the graft's frequency-ranked list
    # (verification stays full-vocabulary). None: the graft's whole list, or the full vocabulary.
    draft_vocab_size: int | None = None
    # Weights of the draft path: the reduced draft head, and on CPU (the product kernel) the
    # MTP layer's linear weights; "auto" is 16-bit (the model's dtype when it is 16-bit, else
    # bfloat16); "int8" / "int4" quantize them at load as --quantization does. Activations stay
    # in the model's dtype. It cuts what drafting streams and only changes which token is
    # drafted in a near-tie (verification is the model's own).
    draft_dtype: str = "auto"
    # Lower K when a step would carry more draft tokens than this (the batch is then compute
    # bound and drafts cost more than they save); 0: never lower it.
    max_draft_tokens_per_step: int = 8
    # Draft position j only while the recent share of steps accepting it (all drafts before it
    # accepted too) is at least this: the j-th draft adds that many tokens per step and costs a
    # chained MTP step plus a verified row (~5-10% of a step on CPU). 0: always draft K.
    min_draft_acceptance: float = 0.1
    # A sequence admitted while more than this many sequences are in the engine (running and
    # waiting, itself included) runs without speculation for its whole life: no drafts, and the
    # MTP layer skips it (its cache is kept only for sequences that may draft). None: the batch
    # size from which ``max_draft_tokens_per_step`` leaves no draft at all; 0: never.
    disable_by_batch_size: int | None = None
    # How drafts of sampled requests without a seed are verified: "rejection" (speculative
    # sampling: accept with probability min(1, p/q), else draw from the residual; exact in
    # distribution, the highest acceptance) or "gumbel" (the shared-noise scheme seeded requests
    # always use: the exact tokens plain sampling with the admission seed would give).
    unseeded_acceptance: str = "rejection"

    def __post_init__(self) -> None:
        if self.unseeded_acceptance not in ACCEPTANCE:
            raise ValueError(f"unseeded_acceptance must be one of {ACCEPTANCE}, got {self.unseeded_acceptance!r}")
        if self.method in MTP_ALIASES:
            object.__setattr__(self, "method", "mtp")
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported; one of "
                             f"{METHODS} (or {', '.join(MTP_ALIASES)}, meaning mtp)")
        if self.method != "mtp" and self.model is None:
            raise ValueError(f"speculative method {self.method} needs its drafter checkpoint: "
                             "speculative_model (--speculative-model DIR)")
        most = MAX_TOKENS[self.method]
        if not 1 <= self.num_speculative_tokens <= most:
            raise ValueError(f"num_speculative_tokens must be in 1..{most} for {self.method}, got "
                             f"{self.num_speculative_tokens}")
        if self.concat_order not in CONCAT_ORDERS:
            raise ValueError(f"concat_order must be one of {CONCAT_ORDERS}, got {self.concat_order!r}")
        for name in ("hidden_stage", "feedback"):
            if getattr(self, name) not in STAGES:
                raise ValueError(f"{name} must be one of {STAGES}, got {getattr(self, name)!r}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.draft_dtype not in DRAFT_DTYPES:
            raise ValueError(f"draft_dtype must be one of {DRAFT_DTYPES}, got {self.draft_dtype!r}")
        if self.max_draft_tokens_per_step < 0:
            raise ValueError("max_draft_tokens_per_step must be >= 0")
        if not 0.0 <= self.min_draft_acceptance < 1.0:
            raise ValueError(f"min_draft_acceptance must be in [0, 1), got {self.min_draft_acceptance}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 0:
            raise ValueError(f"disable_by_batch_size must be >= 0 (0: never), got {self.disable_by_batch_size}")

    @property
    def speculate_up_to(self) -> int:
        """Sequences in the engine up to which a new one speculates (0: any number)."""
        if self.disable_by_batch_size is not None:
            return self.disable_by_batch_size
        return self.max_draft_tokens_per_step

    @property
    def num_lookahead_slots(self) -> int:
        """Slots past the sequence a step may write: K drafts verified (and for MTP K - 1
        chained MTP layer slots; an assistant drafter writes nothing)."""
        k = self.num_speculative_tokens
        return 2 * k - 1 if self.method == "mtp" else k

    @property
    def window_lookback(self) -> int:
        """Keys behind a sliding window that drafting still reads (the driver keeps them): an
        assistant's sliding layers attend one key more than the target's."""
        return 1 if self.method == "gemma4_assistant" else 0
