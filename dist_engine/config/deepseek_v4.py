"""DeepSeek-V4's own hyper-parameters (``V4Config``), read from a ``deepseek_v4`` config.json.

Both spellings are read: transformers' (``layer_types`` with ``compress_rates`` per type,
``mlp_layer_types``, nested ``rope_parameters`` with ``main`` / ``compress``) and the legacy
one of released checkpoints (``compress_ratios`` with one entry per layer plus one for the MTP
layer, 0 or 1 meaning window-only; ``num_hash_layers``; ``qk_rope_head_dim``; flat
``rope_scaling`` that applies to the compressed layers only).

Layer types: a *sliding* layer attends the raw window of its last ``sliding_window`` tokens; a
*compressed sparse* layer (CSA) adds one compressed row per ``m`` tokens from overlapping
windows, of which a lightning indexer picks ``index_topk`` per query; a *heavily compressed*
layer (HCA) adds one row per ``m'`` tokens from disjoint windows, attended densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

V4_ARCHITECTURES = ("DeepseekV4ForCausalLM",)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
DEFAULT_RATES = {CSA: 4, HCA: 128}
SCORING = ("sqrtsoftplus", "sigmoid", "softmax")
EXPERT_DTYPES = ("fp8", "fp4")


@dataclass(frozen=True)
class V4Config:
    """Per layer: its type and compression ratio (0 for sliding layers) and whether its MoE
    routes by token id (hash). Sizes are the model's, not per rank."""

    layer_types: tuple[str, ...]
    compress_ratios: tuple[int, ...]
    hash_layers: tuple[bool, ...]
    sliding_window: int
    rope_dim: int  # the trailing dims of each head that are rotated
    compress_rope_theta: float
    compress_rope_scaling: tuple[tuple[str, Any], ...] | None  # YaRN of the compressed layers
    o_groups: int
    o_lora_rank: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    swiglu_limit: float
    mtp_layer_type: str = SLIDING  # the MTP block attends its window only
    expert_dtype: str | None = None  # "fp4": routed experts in MXFP4 (FP8 otherwise)

    def __post_init__(self) -> None:
        n = len(self.layer_types)
        if len(self.compress_ratios) != n or len(self.hash_layers) != n:
            raise ValueError("layer_types, compress ratios and mlp_layer_types must name every layer")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}; got {bad}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        for i, (kind, m) in enumerate(zip(self.layer_types, self.compress_ratios)):
            if kind == SLIDING:
                continue
            if m < 2 or m & (m - 1):
                raise ValueError(f"layer {i} ({kind}) has compression ratio {m}: it must be a power "
                                 "of two >= 2 (a KV block holds whole compressed rows)")
            if m > self.sliding_window:
                raise ValueError(f"layer {i} ({kind}) compresses windows of {m} tokens but "
                                 f"sliding_window={self.sliding_window} is shorter: the raw window "
                                 "must cover the tokens no compressed row holds yet "
                                 "(sliding_window >= every compression ratio)")
        if CSA in self.layer_types:
            if self.index_topk < 1:
                raise ValueError(f"index_topk={self.index_topk} must be >= 1: compressed sparse "
                                 "attention layers keep that many compressed rows per query")
            if self.index_n_heads < 1 or self.index_head_dim < 2 or self.index_head_dim % 2:
                raise ValueError(f"index_n_heads={self.index_n_heads} must be >= 1 and "
                                 f"index_head_dim={self.index_head_dim} an even number >= 2")
            if self.rope_dim > self.index_head_dim:
                raise ValueError(f"the indexer rotates its last {self.rope_dim} dims, more than "
                                 f"index_head_dim={self.index_head_dim}")
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.rope_dim} must be an even number >= 2")
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            raise ValueError(f"hc_mult={self.hc_mult} and hc_sinkhorn_iters={self.hc_sinkhorn_iters} "
                             "must be >= 1")
        if self.mtp_layer_type != SLIDING:
            raise ValueError(f"the MTP layer is {self.mtp_layer_type}; only a window-only MTP layer "
                             "(compress ratio 0) is supported")
        if self.expert_dtype is not None and self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype {self.expert_dtype!r} is not supported (one of "
                             f"{EXPERT_DTYPES})")

    @property
    def ratios(self) -> tuple[int, ...]:
        """The distinct compression ratios of the compressed layers."""
        return tuple(sorted({m for t, m in zip(self.layer_types, self.compress_ratios) if t != SLIDING}))

    @property
    def compress_rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.compress_rope_scaling) if self.compress_rope_scaling else None


def _rope_parameters(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float, dict[str, Any] | None]:
    """(main theta, main scaling, compress theta, compress scaling): transformers' nested
    ``rope_parameters`` or the legacy flat settings (YaRN on the compressed layers only)."""
    rp = dict(raw.get("rope_parameters") or {})
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = dict(rp["main"]), dict(rp["compress"])
    else:
        flat = {**(raw.get("rope_scaling") or {}), **{k: v for k, v in rp.items() if k not in ("main", "compress")}}
        main = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
        comp = {**flat, "rope_theta": raw.get("compress_rope_theta", 160000.0)}
        comp.setdefault("rope_type", flat.get("type", "default"))
    out = []
    for part in (main, comp):
        theta = float(part.pop("rope_theta", 10000.0))
        kind = part.get("rope_type", part.get("type", "default"))
        part.pop("partial_rotary_factor", None)
        if kind == "yarn":
            part.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin under YaRN
        out += [theta, part if kind != "default" else None]
    return tuple(out)


def v4_fields(raw: dict[str, Any], path: str) -> dict[str, Any]:
    """ModelConfig keyword arguments of a deepseek_v4 config.json (``v4`` holds the rest)."""
    n = raw["num_hidden_layers"]
    head_dim = raw.get("head_dim", 512)
    rates = dict(DEFAULT_RATES)
    rates.update(raw.get("compress_rates") or {})
    for key, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if raw.get(key) is not None:
            rates[kind] = raw[key]
    legacy = raw.get("compress_ratios")
    mtp_type = SLIDING
    if raw.get("layer_types") is not None:
        types = list(raw["layer_types"])
    elif legacy is not None:
        if len(legacy) not in (n, n + 1):
            raise ValueError(f"{path}/config.json: compress_ratios has {len(legacy)} entries; expected "
                             f"num_hidden_layers ({n}) or num_hidden_layers + 1 (the last for the MTP layer)")
        by_rate = {rates[CSA]: CSA, rates[HCA]: HCA}
        unknown = sorted({r for r in legacy if r > 1 and r not in by_rate})
        if unknown:
            raise ValueError(f"{path}/config.json: compress_ratios {unknown} match neither the "
                             f"compressed sparse ({rates[CSA]}) nor the heavily compressed "
                             f"({rates[HCA]}) rate")
        kinds = [SLIDING if r <= 1 else by_rate[r] for r in legacy]
        types, mtp_type = kinds[:n], (kinds[n] if len(kinds) > n else SLIDING)
    else:  # transformers' default schedule
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if len(types) != n:
        raise ValueError(f"{path}/config.json: layer_types has {len(types)} entries for "
                         f"num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"{path}/config.json: layer_types entries must be one of {LAYER_TYPES}; got {bad}")
    if raw.get("mlp_layer_types") is not None:
        mlp = list(raw["mlp_layer_types"])
        bad = sorted({t for t in mlp if t not in ("hash_moe", "moe")})
        if bad or len(mlp) != n:
            raise ValueError(f"{path}/config.json: mlp_layer_types must give 'hash_moe' or 'moe' for "
                             f"each of the {n} layers (got {len(mlp)} entries, unknown {bad})")
        hashed = tuple(t == "hash_moe" for t in mlp)
    else:
        k = raw.get("num_hash_layers", 3)
        hashed = tuple(i < k for i in range(n))
    rope_dim = raw.get("qk_rope_head_dim") or int(head_dim * (raw.get("partial_rotary_factor") or 64 / 512))
    theta, main_scaling, c_theta, c_scaling = _rope_parameters(raw)
    quant = raw.get("quantization_config") or {}
    scoring = raw.get("scoring_func", "sqrtsoftplus")  # V4 always renormalises the top-k weights
    if scoring not in SCORING:
        raise ValueError(f"{path}/config.json: scoring_func {scoring!r} is not supported ({SCORING})")
    v4 = V4Config(
        layer_types=tuple(types),
        compress_ratios=tuple(0 if t == SLIDING else rates[t] for t in types),
        hash_layers=hashed,
        sliding_window=raw.get("sliding_window", 128),
        rope_dim=rope_dim,
        compress_rope_theta=c_theta,
        compress_rope_scaling=tuple(sorted(c_scaling.items())) if c_scaling else None,
        o_groups=raw.get("o_groups", 8),
        o_lora_rank=raw.get("o_lora_rank", 1024),
        index_n_heads=raw.get("index_n_heads", 64),
        index_head_dim=raw.get("index_head_dim", 128),
        index_topk=raw.get("index_topk", 512),
        hc_mult=raw.get("hc_mult", 4),
        hc_sinkhorn_iters=raw.get("hc_sinkhorn_iters", 20),
        hc_eps=float(raw.get("hc_eps", 1e-6)),
        swiglu_limit=float(raw.get("swiglu_limit", 10.0)),
        mtp_layer_type=mtp_type,
        expert_dtype=quant.get("expert_dtype", raw.get("expert_dtype")),
    )
    inter = raw.get("moe_intermediate_size", 2048)
    return dict(
        v4=v4, num_key_value_heads=1, head_dim=head_dim, intermediate_size=inter,
        q_lora_rank=raw.get("q_lora_rank", 1024), rope_theta=theta,
        rope_scaling=tuple(sorted(main_scaling.items())) if main_scaling else None,
        sliding_window=v4.sliding_window,
        n_routed_experts=raw.get("n_routed_experts", 256),
        num_experts_per_tok=raw.get("num_experts_per_tok", 6),
        n_shared_experts=raw.get("n_shared_experts", 1),
        moe_intermediate_size=inter,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.5)),
        norm_topk_prob=True,
        moe_scoring=scoring,
    )
