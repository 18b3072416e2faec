"""EngineArgs: one source of defaults for LLM, AsyncLLM and the CLI; sizes and types checked
with ValueErrors a person can act on."""

from __future__ import annotations

import dataclasses

import pytest

from dist_engine.cli import build_parser, engine_args
from dist_engine.config import CacheConfig, EngineArgs, ParallelConfig, SchedulerConfig
from dist_engine.config.sizes import parse_duration, parse_size


@pytest.mark.parametrize("text,value", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("500MB", 500 * 10**6), ("1000000", 10**6),
    (" 1.5 gib ", 3 * 2**29), ("64KiB", 65536), (4096, 4096), (8.0, 8), ("3e3", 3000),
])
def test_sizes_in_every_accepted_form(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["lots", "2 GiBs", "-1MiB", "", "1.5.2GB", True, None, 2.5, float("inf")])
def test_bad_sizes_name_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="kv_cache_memory.*2GiB"):
        parse_size(bad, "kv_cache_memory")


def test_durations():
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120 and parse_duration(3) == 3.0
    with pytest.raises(ValueError, match="30s"):
        parse_duration("soon", "drain")


def test_python_api_takes_what_the_cli_takes():
    assert EngineArgs(kv_cache_memory="64MiB").kv_cache_memory == 64 * 2**20
    assert EngineArgs(kv_cache_memory=1 << 20).kv_cache_memory == 1 << 20
    cli = engine_args(build_parser().parse_args(["serve", "--kv-cache-memory", "64MiB"]))
    assert cli.kv_cache_memory == 64 * 2**20
    with pytest.raises(ValueError, match="kv_cache_memory: 'plenty' is not a size"):
        EngineArgs(kv_cache_memory="plenty")


@pytest.mark.parametrize("kw,match", [
    (dict(tensor_parallel_size="2"), "tensor_parallel_size must be int"),
    (dict(memory_fraction="half"), "memory_fraction must be float"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching must be bool"),
    (dict(max_num_seqs=True), "max_num_seqs must be int"),
    (dict(speculative="always"), "speculative must be one of"),
    (dict(tensor_paralel_size=2), "unknown engine argument.*tensor_paralel_size.*accepted"),
])
def test_wrong_types_and_names_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs.from_kwargs(**kw)


def test_cli_defaults_are_the_python_defaults():
    """`dist-engine generate` and `serve` with no flags build exactly ``EngineArgs()``, whose
    defaults are the config dataclasses' own (one source)."""
    for cmd in (["generate", "hi"], ["serve"]):
        assert engine_args(build_parser().parse_args(cmd)) == EngineArgs()
    d = EngineArgs()
    assert d.speculative == "auto"  # LLM() speculates where the CLI does
    assert (d.memory_fraction, d.enable_prefix_caching) == (
        CacheConfig.memory_fraction, CacheConfig.enable_prefix_caching)
    assert d.block_size is None  # CacheConfig.block_size unless the model needs larger blocks
    assert d.max_num_seqs == SchedulerConfig.max_num_seqs
    assert d.placement_strategy == ParallelConfig.placement_strategy
    flagged = [f.name for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli_flag")]
    args = build_parser().parse_args(["serve", "--no-prefix-caching", "--tp", "2", "--speculative", "none"])
    assert engine_args(args) == EngineArgs(enable_prefix_caching=False, tensor_parallel_size=2,
                                           speculative="none")
    assert len(flagged) >= 20
