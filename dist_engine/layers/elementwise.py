"""Activations whose result for one row does not depend on how many rows run together.

PyTorch's CPU loops apply an op to whole pairs of SIMD vectors and finish the remaining elements
one at a time with scalar code. For sigmoid, SiLU and softplus the two paths use different
arithmetic, so a decode token's gate (a few elements: all scalar) differed in the last bit from
the same token among others (vector), and a batched step was not bitwise a solo one. Padding each
row to a multiple of ``ROW`` elements keeps every element in whole vectors. (exp, sqrt and
division agree on both paths; the C kernels are row-independent by construction.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ROW = 64  # two vectors of the widest type PyTorch vectorises (AVX-512, 16-bit elements)


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (elementwise) of ``x`` ``[..., n]``, each row computed in whole vectors."""
    n = x.shape[-1]
    pad = -n % ROW
    return fn(F.pad(x, (0, pad)) if pad else x.contiguous())[..., :n]
