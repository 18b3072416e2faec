"""Gumbel noise rows for sampling: ``sampling.c``, or the same stream computed with numpy.

Token k of a row with key K gets ``g = -log(-log(u))``, u from the SplitMix64 finaliser of
``K + (k + 1) * 0x9E3779B97F4A7C15`` (52 bits, in [2^-53, 1 - 2^-53]). Counter-based: any
token's noise is computed on its own, so the C kernel spreads rows and vocabulary chunks over
threads and a row never depends on the batch. The numpy fallback (no C compiler) computes the
same uniforms bit for bit; its logarithm may round differently in rare last bits.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from dist_engine.kernels import bind

_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _kernel():
    """The C function, or None where the kernel is not available."""
    fns = bind("sampling", ((None, "gumbel_noise"),), _ARGS)
    return fns[None] if fns else None


def noise_rows(keys: list[int], vocab: int, use_kernel: bool = True) -> torch.Tensor:
    """``[len(keys), vocab]`` float32 Gumbel(0, 1) noise; keys are in [0, 2^63)."""
    fn = _kernel() if use_kernel else None
    if fn:
        k = torch.tensor(keys, dtype=torch.int64)
        out = torch.empty(len(keys), vocab, dtype=torch.float32)
        fn(k.data_ptr(), len(keys), vocab, out.data_ptr(), torch.get_num_threads())
        return out
    with np.errstate(over="ignore"):
        idx = np.arange(1, vocab + 1, dtype=np.uint64)
        z = np.array(keys, dtype=np.uint64).reshape(-1, 1) + idx * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (np.uint64(0x3FF0000000000000) | (z >> np.uint64(12))).view(np.float64) - (1.0 - 2.0**-53)
    return torch.from_numpy((-np.log(-np.log(u))).astype(np.float32))
