"""Shared machinery of the GAE kernels (gae, ppo_advantages): GAE as a chunked reverse scan.

Per row, walking t from T-1 down to 0, both recurrences of GAE are affine maps x -> a x + b, composed
by ``tl.associative_scan(..., reverse=True)`` over a tile of BLOCK_T steps and carried from tile to tile:
    next value  c_t = m_t ? v_t : c_{t+1}          (a, b) = (0, v_t) or (1, 0); nv_t = c_{t+1}
    advantage   A_t = m_t ? delta_t + g l A_{t+1} : A_{t+1}      (a, b) = (g l, delta_t) or (1, 0)
    delta_t = r_t + gamma nv_t - v_t
nv_t is the scan of the elements shifted by one step (loaded at t + 1), so both scans are inclusive.
(csrc/cpu/gae_scan.h is the C++ scan: row-vectorized, one SIMD lane per row.)
"""

from __future__ import annotations

import struct

import numpy as np
import triton
import triton.language as tl

from . import interpreting
from ._launch import next_pow2


@triton.jit
def compose(a1, b1, a2, b2):
    """The affine map x -> a1 x + b1 followed by x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def scalar(hi, lo, dtype: tl.constexpr):
    """A Python float passed as two fp32 halves (``halves``; Triton passes float arguments as fp32):
    exact enough for fp64 inputs, and just ``hi`` in fp32."""
    return tl.cast(hi, dtype) + tl.cast(lo, dtype)


@triton.jit
def gae_tile(reward, value, valid, value_next, valid_next, next_value_carry, running_carry, gamma, gamma_lambda):
    """One tile [BLOCK_B, BLOCK_T] (ascending t) of the reverse scan. The *_next inputs are the
    same quantities one step later (t + 1; invalid past the tile: identity). Returns advantages,
    returns and the carries into the previous tile: the next value and running advantage seen
    at the tile's first step."""
    zero = tl.zeros_like(value)
    a = tl.where(valid_next, zero, zero + 1.0)
    b = tl.where(valid_next, value_next, zero)
    a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=compose, reverse=True)
    next_value = a_cum * next_value_carry[:, None] + b_cum
    delta = reward + gamma * next_value - value
    a = tl.where(valid, zero + gamma_lambda, zero + 1.0)
    b = tl.where(valid, delta, zero)
    a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=compose, reverse=True)
    running = a_cum * running_carry[:, None] + b_cum
    advantages = tl.where(valid, running, zero)
    returns = tl.where(valid, running + value, zero)
    first = tl.arange(0, value.shape[1])[None, :] == 0
    carry_in = tl.where(valid, value, next_value)  # c_t at each step
    new_next_value = tl.sum(tl.where(first, carry_in, zero), axis=1)
    new_running = tl.sum(tl.where(first, running, zero), axis=1)
    return advantages, returns, new_next_value, new_running


@triton.jit
def scan_start(gamma_hi, gamma_lo, gamma_lambda_hi, gamma_lambda_lo, acc_dtype: tl.constexpr, BLOCK_B: tl.constexpr):
    """(gamma, gamma * lam, next value, running advantage) at the start (the end of the rows) of the reverse
    scan of a block of BLOCK_B rows."""
    return (scalar(gamma_hi, gamma_lo, acc_dtype), scalar(gamma_lambda_hi, gamma_lambda_lo, acc_dtype),
            tl.zeros((BLOCK_B,), acc_dtype), tl.zeros((BLOCK_B,), acc_dtype))


@triton.jit
def load_values_tile(values_ptr, mask_ptr, rows, cols, row_ok, T, stride_v, stride_m, acc_dtype: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """A tile's values and response mask, and the same one step later (t + 1; invalid past the tile or the
    row), with ``inside``: the tile's elements that exist."""
    inside = row_ok[:, None] & (cols < T)[None, :]
    inside_next = row_ok[:, None] & (cols + 1 < T)[None, :] & (tl.arange(0, BLOCK_T) + 1 < BLOCK_T)[None, :]
    v_off, m_off = rows[:, None] * stride_v, rows[:, None] * stride_m
    value = tl.load(values_ptr + v_off + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
    valid = tl.load(mask_ptr + m_off + cols[None, :], mask=inside, other=0) != 0
    value_next = tl.load(values_ptr + v_off + cols[None, :] + 1, mask=inside_next, other=0.0).to(acc_dtype)
    valid_next = tl.load(mask_ptr + m_off + cols[None, :] + 1, mask=inside_next, other=0) != 0
    return inside, value, valid, value_next, valid_next


# 4 rows x 128 steps per tile on 2 warps: 8 elements per thread, so bf16 rows load 16 bytes at a time.
SCAN_BLOCK_B, SCAN_BLOCK_T, SCAN_WARPS = 4, 128, 2


def scan_blocks(T: int) -> tuple[int, int]:
    # The interpreter runs a scan element by element in Python: short tiles there keep the tests
    # fast and make even small T cross several tiles (the carries between tiles get exercised).
    block_t = 16 if interpreting() else SCAN_BLOCK_T
    return SCAN_BLOCK_B, min(block_t, next_pow2(max(T, 2)))


_FP32 = struct.Struct("f")


def halves(x: float) -> tuple[float, float]:
    """x as fp32 hi + fp32 lo (see ``scalar``). The round trip through struct's "f" rounds as the C cast does,
    as np.float32 (~0.5 us a call less); it refuses only what rounds to inf: numpy then gives the inf."""
    pack, unpack = _FP32.pack, _FP32.unpack
    try:
        hi = unpack(pack(x))[0]
        return hi, unpack(pack(x - hi))[0]
    except OverflowError:
        hi = float(np.float32(x))
        return hi, float(np.float32(x - hi))
