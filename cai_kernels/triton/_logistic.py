"""Shared math of the preference-model kernels (pairwise_loss, ranked_pairwise_loss): softplus and sigmoid
that never overflow. With e = exp(-|x|) <= 1:
    softplus(x) = max(x, 0) + log1p(e),   sigmoid(x) = x >= 0 ? 1 / (1 + e) : e / (1 + e)
The C++ kernels have the same in csrc/cpu/logistic.h.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0 with full relative precision for tiny x (Goldberg: log(u) * x / (u - 1), u = 1 + x
    rounded; exact algebra since u - 1 is the x that u really holds). Triton has no log1p; tl.log is libdevice's
    logf on GPUs, accurate near 1."""
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def softplus(x):
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    return tl.where(x >= 0, big, e * big)
