"""Shared math of the KL kernels (kl_penalty, ppo_advantages): Schulman's per-token estimators of a clamped
log-ratio r, the estimate then clamped (csrc/cpu/kl_math.h has the same):
    k1 = r    k2 = r^2 / 2    k3 = e^-r - 1 + r    abs = |r|
k3 without cancellation: a series for |r| <= 1 (exact to a few ulp and >= 0), the direct form beyond.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .._params import KlEstimator

K1, K2, K3 = tl.constexpr(int(KlEstimator.K1)), tl.constexpr(int(KlEstimator.K2)), tl.constexpr(int(KlEstimator.K3))


@triton.jit
def exp_minus_1_minus_x(x):
    """e^x - 1 - x without cancellation: its Taylor series for |x| <= 1, the direct form beyond (+inf at
    x = +inf, where the direct form would be inf - inf)."""
    p = x * (1.0 / 6227020800.0) + (1.0 / 479001600.0)
    p = p * x + (1.0 / 39916800.0)
    p = p * x + (1.0 / 3628800.0)
    p = p * x + (1.0 / 362880.0)
    p = p * x + (1.0 / 40320.0)
    p = p * x + (1.0 / 5040.0)
    p = p * x + (1.0 / 720.0)
    p = p * x + (1.0 / 120.0)
    p = p * x + (1.0 / 24.0)
    p = p * x + (1.0 / 6.0)
    p = p * x + 0.5
    return tl.where(tl.abs(x) <= 1.0, x * x * p, tl.where(x == float("inf"), x, tl.exp(x) - 1.0 - x))


@triton.jit
def kl_value(r, ESTIMATOR: tl.constexpr):
    """The estimate of r; ESTIMATOR is a KlEstimator (cai_kernels/_params.py)."""
    if ESTIMATOR == K1:
        kl = r
    elif ESTIMATOR == K2:
        kl = 0.5 * r * r
    elif ESTIMATOR == K3:
        kl = exp_minus_1_minus_x(-r)
    else:
        kl = tl.abs(r)
    return kl


@triton.jit
def kl_forward(raw, lo, hi, out_lo, out_hi, ESTIMATOR: tl.constexpr):
    r = clamp_nan(raw, lo, hi)
    return clamp_nan(kl_value(r, ESTIMATOR), out_lo, out_hi)


@triton.jit
def clamp_nan(x, lo, hi):
    """x clamped to [lo, hi] as torch.clamp: NaN stays NaN (Triton's default minimum / maximum drop it)."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


def bound(value: float) -> float:
    """Kernel scalars are fp32: the finite "no bound" stand-in (NO_BOUND) becomes inf."""
    return value if abs(value) < 3.4e38 else math.copysign(math.inf, value)


def kl_bounds(params) -> tuple[float, float, float, float]:
    """(clamp_lo, clamp_hi, output_clamp_lo, output_clamp_hi) of a KlPenaltyParams / PpoAdvantagesParams,
    as the kernels take them."""
    # bound() inlined (a call's host time): -FP32_MAX < v < FP32_MAX is abs(v) < FP32_MAX
    lo, hi, out_lo, out_hi = params.clamp_lo, params.clamp_hi, params.output_clamp_lo, params.output_clamp_hi
    return (lo if -3.4e38 < lo < 3.4e38 else math.copysign(math.inf, lo),
            hi if -3.4e38 < hi < 3.4e38 else math.copysign(math.inf, hi),
            out_lo if -3.4e38 < out_lo < 3.4e38 else math.copysign(math.inf, out_lo),
            out_hi if -3.4e38 < out_hi < 3.4e38 else math.copysign(math.inf, out_hi))
