"""What the start-up log says about memory: weights, budget, and each cache kind's bytes."""

from __future__ import annotations

import logging

from dist_engine.config import EngineConfig
from dist_engine.kv_cache.kinds import CacheLayout

log = logging.getLogger("dist_engine.engine.llm_engine")
MIB = 2**20


def log_cache(config: EngineConfig, info: dict, layout: CacheLayout) -> None:
    """Weights (and their bytes per format: dtype or quantization) and measured peaks, then per kind: paged kinds in bytes per token (and blocks,
    tokens, MiB allocated), recurrent state in bytes per sequence (slots bound concurrency;
    checkpoints and their interval), then what the layout can serve."""
    bs, par, sc = config.cache.block_size, config.parallel, config.scheduler
    measured = (f", activation peak {info['activation_peak_bytes'] / MIB:.0f} MiB, KV budget "
                f"{info['kv_budget_bytes'] / MIB:.0f} MiB" if "activation_peak_bytes" in info else "")
    formats = ", ".join(f"{k[len('weight_bytes['):-1]} {v / MIB:.1f}" for k, v in info.items()
                        if k.startswith("weight_bytes["))
    log.info("memory per rank: weights %.0f MiB (%s MiB)%s", info["weight_bytes"] / MIB, formats, measured)
    allocated = info["allocated_bytes"]
    roles = info.get("bytes_by_role", {})
    for group, per_block in info["bytes_per_block_by_group"].items():
        parts = roles.get(group, {})
        detail = (" = " + " + ".join(f"{label} {b:g}" for label, b in parts.items())
                  if len(parts) > 1 or any("1/" in label for label in parts) else "")
        log.info("KV cache per rank, %s attention: %d blocks x %d tokens, %g bytes/token%s (%s), "
                 "%.1f MiB", group, layout.group_blocks(group), bs, per_block / bs, detail,
                 config.cache.kv_cache_dtype, allocated.get(group, 0) / MIB)
    if layout.num_state_slots:
        per_seq = info["state_bytes_per_seq"]
        parts = roles.get("state", {})
        detail = " (" + " + ".join(f"{label} {b:g}" for label, b in parts.items()) + ")" if parts else ""
        log.info("recurrent state per rank: %d bytes/sequence%s (= %d tokens of attention KV); %d "
                 "live slots (at most %d sequences run at once) + %d prefix checkpoints every %d "
                 "tokens, %.1f MiB", per_seq, detail, per_seq // max(1, info["bytes_per_block"] // bs),
                 layout.num_state_slots, layout.num_state_slots, layout.num_checkpoints,
                 config.cache.state_checkpoint_interval, allocated.get("state", 0) / MIB)
    shards = par.num_kv_shards
    num_blocks = layout.num_blocks * shards
    per_seq_blocks = -(-sc.max_model_len // bs)
    concurrent = num_blocks // per_seq_blocks
    if layout.num_state_slots:
        concurrent = min(concurrent, layout.num_state_slots)
    log.info("layout TP=%d x CP=%d (DCP=%d inside TP): %d sequence shards of %d blocks; longest "
             "context the cache can hold: %d tokens; max concurrent sequences at max_model_len=%d: %d",
             par.tensor_parallel_size, par.context_parallel_size, par.decode_context_parallel_size,
             shards, layout.num_blocks, num_blocks * bs, sc.max_model_len, concurrent)
