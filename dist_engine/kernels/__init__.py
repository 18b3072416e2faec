"""CPU kernels written in C: compiled on first use, loaded with ctypes.

PyTorch's eager operators cover everything the engine does, but some steps cost far more than
their arithmetic on a CPU: decode attention over a paged cache gathers every sequence's keys
into a padded batch and builds a mask before the fused kernel runs. The few kernels here do such
steps directly. Each is a plain C file next to this module (or a few: ``EXTRA_SOURCES``),
compiled once per machine with the system C compiler (``cc -O3 -march=native -fopenmp``) into
``$DIST_ENGINE_CACHE/kernels`` and keyed by its sources, flags and CPU, so editing a kernel or moving the cache to another CPU
rebuilds it. Each call passes ``torch.get_num_threads()``, so a kernel uses as many threads as
the rank's PyTorch operators (shared runtime when torch's libgomp is the system's soname).

Without a compiler (or with ``DIST_ENGINE_CPU_KERNELS=0``) ``load`` returns None and callers
keep their PyTorch path; the tests check both paths against each other.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch  # noqa: F401  (loads PyTorch's OpenMP runtime before any kernel library)

log = logging.getLogger(__name__)

ENV_SWITCH = "DIST_ENGINE_CPU_KERNELS"  # "0": never build or use the C kernels
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
# glibc's vector math (libmvec) where a kernel vectorises log / exp; other kernels only -lm
LIBS = {name: ("-lmvec", "-lm") for name in ("sampling", "paged_attention", "fused")}
EXTRA_FLAGS = {"fused": ("-ffp-contract=off",)}  # round a*b - c*d as PyTorch does (no FMA)
EXTRA_SOURCES = {"qlinear": ("qlinear_int.c",)}  # libraries built from more than one file


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def _cpu_signature() -> bytes:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            sig += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return sig.encode()


def _kernel_dir() -> Path:
    from dist_engine.weights.registry import cache_dir

    return Path(cache_dir()) / "kernels"


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of ``<name>.c`` in this folder, building it if needed; None when
    kernels are switched off or cannot be built or loaded here (logged once)."""
    if not enabled():
        return None
    wanted = os.environ.get("CC", "cc")
    cc = shutil.which(wanted) or (None if "CC" in os.environ else shutil.which("gcc"))
    if cc is None:
        log.warning("no C compiler (%s): %s runs through PyTorch / numpy instead; install "
                    "gcc (Debian: build-essential) for the faster kernel", wanted, name)
        return None
    try:
        return ctypes.CDLL(str(_build(name, cc)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip()[-500:] if isinstance(e, subprocess.CalledProcessError) else e
        log.warning("could not build or load the %s kernel with %s (%s); using PyTorch / numpy",
                    name, cc, detail)
        return None


def _build(name: str, cc: str) -> Path:
    here = Path(__file__).parent
    srcs = [here / f"{name}.c", *(here / s for s in EXTRA_SOURCES.get(name, ()))]
    libs = LIBS.get(name, ("-lm",))
    flags = (*FLAGS, *EXTRA_FLAGS.get(name, ()))
    code = b"".join(s.read_bytes() for s in srcs)
    headers = b"".join(h.read_bytes() for h in sorted(here.glob("*.h")))  # shared helpers
    key = hashlib.sha256(code + headers + " ".join((cc, *flags, *libs)).encode() + _cpu_signature())
    out_dir = _kernel_dir()
    lib = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.lock", "w") as lock:  # ranks starting together build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
            try:
                subprocess.run([cc, *flags, *map(str, srcs), "-o", str(tmp), *libs],
                               capture_output=True, text=True, check=True)
                os.replace(tmp, lib)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("built %s", lib)
    return lib


def bind(name: str, symbols: tuple, argtypes: tuple, restype=None) -> dict | None:
    """``{key: function}`` for the exported ``symbols`` (``((key, symbol name), ...)``) of
    kernel ``name``, all with the signature ``argtypes -> restype``; None when the kernel is not
    available here."""
    lib = load(name)
    if lib is None:
        return None
    fns = {}
    for key, symbol in symbols:
        fn = getattr(lib, symbol)
        fn.argtypes, fn.restype = list(argtypes), restype
        fns[key] = fn
    return fns
