"""Engine flags generated from ``EngineArgs``, size arguments and the NCCL switches the
serving commands share."""

from __future__ import annotations

import argparse
import dataclasses

from dist_engine.config import EngineArgs
from dist_engine.config.sizes import parse_size


def parse_bytes(text: str) -> int:
    try:
        return parse_size(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per ``EngineArgs`` field that has one, with its default and help from there."""
    for f in dataclasses.fields(EngineArgs):
        meta = dict(f.metadata)
        flag = meta.pop("cli_flag", None)
        if flag is None:
            continue
        help_text = meta.pop("help", "")
        if f.type in ("bool", bool):  # store_true flags; --no-X flags store False
            action = "store_false" if flag.startswith("--no-") else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=f.default, help=help_text)
            continue
        kind = parse_bytes if "int | str" in str(f.type) else _scalar_type(f.type)
        shown = "" if f.default is None else " (default: %(default)s)"
        if "choices" not in meta:
            meta["metavar"] = flag[2:].upper().replace("-", "_")
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text + shown, **meta)


def _scalar_type(annotation) -> type:
    """int / float / str from an annotation such as ``"int | None"``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return next((t for t in (int, float) if text.split(" |")[0] == t.__name__), str)


def engine_args(a: argparse.Namespace, **overrides) -> EngineArgs:
    """``EngineArgs`` from parsed flags (fields without a flag keep their defaults)."""
    names = {f.name for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli_flag")}
    return EngineArgs(**{k: v for k, v in vars(a).items() if k in names}, **overrides)


def add_nccl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default=None, help="GPU indices to use, e.g. 0,1 (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--nccl-p2p-off", action="store_true",
                   help="NCCL_P2P_DISABLE=1: cards whose peer-to-peer hangs or fails the all-reduce")
    p.add_argument("--nccl-socket-ifname", default=None,
                   help="NCCL_SOCKET_IFNAME: the network interface ranks talk over")
    p.add_argument("--nccl-no-shm", action="store_true",
                   help="NCCL_SHM_DISABLE=1: containers with a tiny /dev/shm ('Bus error')")
    p.add_argument("--nccl-debug", action="store_true", help="NCCL_DEBUG=INFO")
