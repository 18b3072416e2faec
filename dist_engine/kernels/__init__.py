"""CPU kernels written in C: compiled on first use, loaded with ctypes.

PyTorch's eager operators cover everything the engine does, but some steps cost far more than
their arithmetic on a CPU: decode attention over a paged cache gathers every sequence's keys
into a padded batch and builds a mask before the fused kernel runs. The few kernels here do such
steps directly. Each is a plain C file next to this module, compiled once per machine with the
system C compiler (``cc -O3 -march=native -fopenmp``) into ``$DIST_ENGINE_CACHE/kernels`` and
keyed by its source, flags and CPU, so editing a kernel or moving the cache to another CPU
rebuilds it. Torch is imported first, so the kernels share PyTorch's OpenMP runtime and threads.

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
    kernels are switched off or cannot be built here (logged once)."""
    if not enabled():
        return None
    wanted = os.environ.get("CC", "cc")
    cc = shutil.which(wanted) or (None if "CC" in os.environ else shutil.which("gcc"))
    src = Path(__file__).with_name(f"{name}.c")
    if cc is None:
        log.warning("no C compiler (%s): %s runs through PyTorch operators instead; install "
                    "gcc (Debian: build-essential) for the faster kernel", wanted, name)
        return None
    key = hashlib.sha256(src.read_bytes() + " ".join((cc, *FLAGS)).encode() + _cpu_signature())
    out_dir = _kernel_dir()
    lib = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{name}.lock", "w") as lock:  # ranks starting together build once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not lib.exists():
                tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
                res = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp), "-lmvec", "-lm"],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    log.warning("could not compile %s with %s (%s); using PyTorch operators",
                                src.name, cc, res.stderr.strip()[-500:])
                    return None
                os.replace(tmp, lib)
                log.info("built %s", lib)
    return ctypes.CDLL(str(lib))
