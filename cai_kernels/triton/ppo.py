"""Triton kernels for the PPO family: KL estimates, GAE, whitening, the fused advantages, clipped losses.

Layouts: (B, T) tensors with a unit stride along T and any row stride (``stride_*`` arguments);
outputs are contiguous. Masks are read in their own dtype (bool as uint8), nonzero = response
token; masked positions go through ``tl.where`` (never a multiply), so padding that holds NaN or
inf cannot leak. Every grid is 1-D on axis 0 (no 65535 limit).

GAE as a chunked reverse scan. Per row, walking t from T-1 down to 0, both recurrences of GAE are
affine maps x -> a x + b, composed by ``tl.associative_scan(..., reverse=True)`` over a tile of
BLOCK_T steps and carried from tile to tile:
    next value  c_t = m_t ? v_t : c_{t+1}          (a, b) = (0, v_t) or (1, 0); nv_t = c_{t+1}
    advantage   A_t = m_t ? delta_t + g l A_{t+1} : A_{t+1}      (a, b) = (g l, delta_t) or (1, 0)
    delta_t = r_t + gamma nv_t - v_t
nv_t is the scan of the elements shifted by one step (loaded at t + 1), so both scans are
inclusive. Whitening statistics are per-row moments (two passes over the row) merged on the host
side of the launcher in fp64 (Chan et al.), then one normalizing pass.
"""

from __future__ import annotations

import math

import numpy as np

import torch
import triton
import triton.language as tl

from ..reference.ppo import LOG_RATIO_LIMIT
from . import interpreting

# ---- shared math -------------------------------------------------------------------------------


@triton.jit
def _exp_minus_1_minus_x(x):
    """e^x - 1 - x without cancellation: its Taylor series for |x| <= 1, the direct form beyond."""
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
    return tl.where(tl.abs(x) <= 1.0, x * x * p, tl.exp(x) - 1.0 - x)


@triton.jit
def _kl_value(r, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == 0:
        kl = r
    elif ESTIMATOR == 1:
        kl = 0.5 * r * r
    elif ESTIMATOR == 2:
        kl = _exp_minus_1_minus_x(-r)
    else:
        kl = tl.abs(r)
    return kl


@triton.jit
def _kl_forward(raw, lo, hi, out_lo, out_hi, ESTIMATOR: tl.constexpr):
    r = tl.minimum(tl.maximum(raw, lo), hi)
    return tl.minimum(tl.maximum(_kl_value(r, ESTIMATOR), out_lo), out_hi)


@triton.jit
def _compose(a1, b1, a2, b2):
    """The affine map x -> a1 x + b1 followed by x -> a2 x + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _max_grad(a, b, da, db):
    """d max(a, b) as torch.maximum: the larger branch's, or their mean on a tie."""
    return tl.where(a > b, da, tl.where(b > a, db, 0.5 * (da + db)))


# ---- kl_penalty --------------------------------------------------------------------------------


@triton.jit
def kl_penalty_kernel(
    lp_ptr, ref_ptr, grad_ptr, out_ptr,
    inner, lp_stride_outer, lp_stride_inner, ref_stride_outer, ref_stride_inner, T, col_blocks,
    lo, hi, out_lo, out_hi,
    ESTIMATOR: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Forward: out = the estimate (grad_ptr only gives the compute dtype). Backward: out = grad *
    d estimate / d r in the inputs' dtype, a clamp passing the gradient where lo <= x <= hi."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    acc_dtype = grad_ptr.dtype.element_ty
    lp_row = lp_ptr + (row // inner) * lp_stride_outer + (row % inner) * lp_stride_inner
    ref_row = ref_ptr + (row // inner) * ref_stride_outer + (row % inner) * ref_stride_inner
    raw = tl.load(lp_row + cols, mask=in_row, other=0.0).to(acc_dtype) - tl.load(
        ref_row + cols, mask=in_row, other=0.0).to(acc_dtype)
    if BACKWARD:
        g = tl.load(grad_ptr + row * T + cols, mask=in_row, other=0.0)
        r = tl.minimum(tl.maximum(raw, lo), hi)
        kl = _kl_value(r, ESTIMATOR)
        if ESTIMATOR == 0:
            d = tl.full(r.shape, 1.0, acc_dtype)
        elif ESTIMATOR == 1:
            d = r
        elif ESTIMATOR == 2:
            d = -(_exp_minus_1_minus_x(-r) - r)  # 1 - e^-r = -(e^-r - 1)
        else:
            d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0)).to(acc_dtype)
        # a zero upstream gradient stays zero where d is infinite (k3 beyond exp's range)
        passes = (raw >= lo) & (raw <= hi) & (kl >= out_lo) & (kl <= out_hi) & (g != 0)
        out = tl.where(passes, g * d, 0.0)
    else:
        out = _kl_forward(raw, lo, hi, out_lo, out_hi, ESTIMATOR)
    tl.store(out_ptr + row * T + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


def _bound(value: float) -> float:
    """Kernel scalars are fp32: the finite "no bound" stand-in becomes inf."""
    return value if abs(value) < 3.4e38 else math.copysign(math.inf, value)


def _kl_block(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 16)), 1024)


def _launch_kl(logprobs, ref_logprobs, grad, out, estimator, bounds, backward):
    rows, T = logprobs.size(0) * logprobs.size(1), logprobs.size(2)
    if rows and T:
        block = _kl_block(T)
        col_blocks = triton.cdiv(T, block)
        kl_penalty_kernel[(rows * col_blocks,)](
            logprobs, ref_logprobs, grad, out, logprobs.size(1), logprobs.stride(0), logprobs.stride(1),
            ref_logprobs.stride(0), ref_logprobs.stride(1), T, col_blocks, *map(_bound, bounds),
            ESTIMATOR=estimator, BACKWARD=backward, BLOCK_T=block)
    return out


def kl_penalty_fwd(logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi):
    """Same contract as torch.ops.cai_kernels_cpu.kl_penalty_fwd: (outer, inner, T) views in, (rows, T) out."""
    out = torch.empty(logprobs.size(0) * logprobs.size(1), logprobs.size(2), dtype=_acc(logprobs.dtype),
                      device=logprobs.device)
    return _launch_kl(logprobs, ref_logprobs, out, out, estimator, (lo, hi, out_lo, out_hi), False)


def kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi):
    out = torch.empty(logprobs.size(0) * logprobs.size(1), logprobs.size(2), dtype=logprobs.dtype,
                      device=logprobs.device)
    return _launch_kl(logprobs, ref_logprobs, grad, out, estimator, (lo, hi, out_lo, out_hi), True)


# ---- GAE scan, fused advantages ----------------------------------------------------------------


@triton.jit
def _scalar(hi, lo, dtype: tl.constexpr):
    """A Python float passed as two fp32 halves (Triton passes float arguments as fp32): exact
    enough for fp64 inputs, and just ``hi`` in fp32."""
    return tl.cast(hi, dtype) + tl.cast(lo, dtype)


@triton.jit
def _gae_tile(reward, value, valid, value_next, valid_next, next_value_carry, running_carry, gamma, gamma_lambda):
    """One tile [BLOCK_B, BLOCK_T] (ascending t) of the reverse scan. The *_next inputs are the
    same quantities one step later (t + 1; invalid past the tile: identity). Returns advantages,
    returns and the carries into the previous tile: the next value and running advantage seen
    at the tile's first step."""
    zero = tl.zeros_like(value)
    a = tl.where(valid_next, zero, zero + 1.0)
    b = tl.where(valid_next, value_next, zero)
    a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=_compose, reverse=True)
    next_value = a_cum * next_value_carry[:, None] + b_cum
    delta = reward + gamma * next_value - value
    a = tl.where(valid, zero + gamma_lambda, zero + 1.0)
    b = tl.where(valid, delta, zero)
    a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=_compose, reverse=True)
    running = a_cum * running_carry[:, None] + b_cum
    advantages = tl.where(valid, running, zero)
    returns = tl.where(valid, running + value, zero)
    first = tl.arange(0, value.shape[1])[None, :] == 0
    carry_in = tl.where(valid, value, next_value)  # c_t at each step
    new_next_value = tl.sum(tl.where(first, carry_in, zero), axis=1)
    new_running = tl.sum(tl.where(first, running, zero), axis=1)
    return advantages, returns, new_next_value, new_running


@triton.jit
def gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    B, T, stride_r, stride_v, stride_m, gamma_hi, gamma_lo, gamma_lambda_hi, gamma_lambda_lo,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    acc_dtype = adv_ptr.dtype.element_ty
    gamma = _scalar(gamma_hi, gamma_lo, acc_dtype)
    gamma_lambda = _scalar(gamma_lambda_hi, gamma_lambda_lo, acc_dtype)
    next_value = tl.zeros((BLOCK_B,), acc_dtype)
    running = tl.zeros((BLOCK_B,), acc_dtype)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = row_ok[:, None] & (cols < T)[None, :]
        inside_next = row_ok[:, None] & (cols + 1 < T)[None, :] & (tl.arange(0, BLOCK_T) + 1 < BLOCK_T)[None, :]
        r_off, v_off, m_off = rows[:, None] * stride_r, rows[:, None] * stride_v, rows[:, None] * stride_m
        reward = tl.load(rewards_ptr + r_off + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        value = tl.load(values_ptr + v_off + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        valid = tl.load(mask_ptr + m_off + cols[None, :], mask=inside, other=0) != 0
        value_next = tl.load(values_ptr + v_off + cols[None, :] + 1, mask=inside_next, other=0.0).to(acc_dtype)
        valid_next = tl.load(mask_ptr + m_off + cols[None, :] + 1, mask=inside_next, other=0) != 0
        advantages, returns, next_value, running = _gae_tile(
            reward, value, valid, value_next, valid_next, next_value, running, gamma, gamma_lambda)
        out = rows[:, None] * T + cols[None, :]
        tl.store(adv_ptr + out, advantages, mask=inside)
        tl.store(ret_ptr + out, returns, mask=inside)


@triton.jit
def ppo_advantages_kernel(
    scores_ptr, lp_ptr, ref_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, rewards_ptr, kl_ptr, stats_ptr,
    B, T, stride_lp, stride_ref, stride_v, stride_m, neg_kl_coef_hi, neg_kl_coef_lo, gamma_hi, gamma_lo,
    gamma_lambda_hi, gamma_lambda_lo, lo, hi, out_lo, out_hi,
    ESTIMATOR: tl.constexpr, WHITEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    acc_dtype = adv_ptr.dtype.element_ty
    neg_kl_coef = _scalar(neg_kl_coef_hi, neg_kl_coef_lo, acc_dtype)
    gamma = _scalar(gamma_hi, gamma_lo, acc_dtype)
    gamma_lambda = _scalar(gamma_lambda_hi, gamma_lambda_lo, acc_dtype)
    score = tl.load(scores_ptr + rows, mask=row_ok, other=0.0)
    next_value = tl.zeros((BLOCK_B,), acc_dtype)
    running = tl.zeros((BLOCK_B,), acc_dtype)
    seen = tl.zeros((BLOCK_B,), tl.int32)  # a later response token exists: the score is placed
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside = row_ok[:, None] & (cols < T)[None, :]
        inside_next = row_ok[:, None] & (cols + 1 < T)[None, :] & (tl.arange(0, BLOCK_T) + 1 < BLOCK_T)[None, :]
        v_off, m_off = rows[:, None] * stride_v, rows[:, None] * stride_m
        valid = tl.load(mask_ptr + m_off + cols[None, :], mask=inside, other=0) != 0
        lp = tl.load(lp_ptr + rows[:, None] * stride_lp + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        ref = tl.load(ref_ptr + rows[:, None] * stride_ref + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        kl = tl.where(valid, _kl_forward(lp - ref, lo, hi, out_lo, out_hi, ESTIMATOR), 0.0)
        # the row's last response token: the last valid step of this tile if none came later
        later = tl.cumsum(valid.to(tl.int32), axis=1, reverse=True)
        is_last = valid & (later == 1) & (seen == 0)[:, None]
        seen = seen + tl.sum(valid.to(tl.int32), axis=1)
        reward = tl.where(valid, neg_kl_coef * kl, 0.0) + tl.where(is_last, score[:, None], 0.0)
        value = tl.load(values_ptr + v_off + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        value_next = tl.load(values_ptr + v_off + cols[None, :] + 1, mask=inside_next, other=0.0).to(acc_dtype)
        valid_next = tl.load(mask_ptr + m_off + cols[None, :] + 1, mask=inside_next, other=0) != 0
        advantages, returns, next_value, running = _gae_tile(
            reward, value, valid, value_next, valid_next, next_value, running, gamma, gamma_lambda)
        out = rows[:, None] * T + cols[None, :]
        tl.store(kl_ptr + out, kl, mask=inside)
        tl.store(rewards_ptr + out, reward, mask=inside)
        tl.store(adv_ptr + out, advantages, mask=inside)
        tl.store(ret_ptr + out, returns, mask=inside)
    if WHITEN:
        tl.debug_barrier()  # the moments re-read advantages other threads of this program wrote
        _row_moments(adv_ptr, mask_ptr, stats_ptr, rows, row_ok, T, T, stride_m, BLOCK_T)


@triton.jit
def _row_moments(x_ptr, mask_ptr, stats_ptr, rows, row_ok, T, stride_x, stride_m, BLOCK_T: tl.constexpr):
    """Per row: (count, mean, M2) of x over response tokens, two passes; stats is (B, 3)."""
    acc_dtype = stats_ptr.dtype.element_ty  # fp64: a sum of values like 1e4 +- 1 keeps the mean exact
    count = tl.zeros((rows.shape[0],), acc_dtype)
    total = tl.zeros((rows.shape[0],), acc_dtype)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = row_ok[:, None] & (cols < T)[None, :]
        valid = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0) != 0
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        count += tl.sum(valid.to(acc_dtype), axis=1)
        total += tl.sum(tl.where(valid, x, 0.0), axis=1)
    mean = total / tl.maximum(count, 1.0)
    m2 = tl.zeros((rows.shape[0],), acc_dtype)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = row_ok[:, None] & (cols < T)[None, :]
        valid = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0) != 0
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        d = tl.where(valid, x - mean[:, None], 0.0)
        m2 += tl.sum(d * d, axis=1)
    tl.store(stats_ptr + rows * 3, count, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)


@triton.jit
def row_moments_kernel(x_ptr, mask_ptr, stats_ptr, B, T, stride_x, stride_m,
                       BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    _row_moments(x_ptr, mask_ptr, stats_ptr, rows, rows < B, T, stride_x, stride_m, BLOCK_T)


@triton.jit
def whiten_kernel(x_ptr, mask_ptr, out_ptr, map_ptr, T, stride_x, stride_m, col_blocks, BLOCK_T: tl.constexpr):
    """out = ((x - mean_hi) - mean_lo) * scale + add_back on response tokens, 0 elsewhere, with map =
    (mean_hi, mean_lo, scale, add_back): the mean split into its rounding and the rounding error, so
    that x - mean_hi is exact near the mean (large offsets lose nothing)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    acc_dtype = out_ptr.dtype.element_ty
    mean_hi, mean_lo = tl.load(map_ptr), tl.load(map_ptr + 1)
    scale, add_back = tl.load(map_ptr + 2), tl.load(map_ptr + 3)
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
    valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
    tl.store(out_ptr + row * T + cols, tl.where(valid, ((x - mean_hi) - mean_lo) * scale + add_back, 0.0), mask=in_row)


def _as_kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# 4 rows x 128 steps per tile on 2 warps: 8 elements per thread, so bf16 rows load 16 bytes at a time.
SCAN_BLOCK_B, SCAN_BLOCK_T, SCAN_WARPS = 4, 128, 2


def _scan_blocks(T: int) -> tuple[int, int]:
    # The interpreter runs a scan element by element in Python: short tiles there keep the tests
    # fast and make even small T cross several tiles (the carries between tiles get exercised).
    block_t = 16 if interpreting() else SCAN_BLOCK_T
    return SCAN_BLOCK_B, min(block_t, triton.next_power_of_2(max(T, 2)))


def _halves(x: float) -> tuple[float, float]:
    """x as fp32 hi + fp32 lo (see _scalar)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def gae_fwd(rewards, values, mask, gamma, lam):
    """Same contract as torch.ops.cai_kernels_cpu.gae_fwd."""
    B, T = rewards.shape
    acc = _acc(rewards.dtype)
    adv = torch.empty(B, T, dtype=acc, device=rewards.device)
    ret = torch.empty(B, T, dtype=acc, device=rewards.device)
    if B and T:
        block_b, block_t = _scan_blocks(T)
        gae_kernel[(triton.cdiv(B, block_b),)](
            rewards, values, _as_kernel_mask(mask), adv, ret, B, T, rewards.stride(0), values.stride(0),
            mask.stride(0), *_halves(gamma), *_halves(gamma * lam), BLOCK_B=block_b, BLOCK_T=block_t, num_warps=SCAN_WARPS)
    return adv, ret


def _whiten_map(stats: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, dtype) -> torch.Tensor:
    """Merges per-row (count, mean, M2) in fp64 into (mean_hi, mean_lo, scale, add_back) for whiten_kernel."""
    count, mean, m2 = stats.double().unbind(1)
    n = count.sum()
    batch_mean = (count * mean).sum() / n.clamp(min=1)
    batch_m2 = m2.sum() + (count * (mean - batch_mean).square()).sum()
    denominator = torch.where((n > 1) & unbiased, n - 1, n.clamp(min=1))
    scale = torch.rsqrt(batch_m2 / denominator + eps)
    add_back = torch.zeros_like(batch_mean) if shift_mean else batch_mean
    mean_hi = batch_mean.to(dtype).double()
    return torch.stack([mean_hi, batch_mean - mean_hi, scale, add_back]).to(dtype)


def _whiten_into(x, mask, out, whiten_map):
    B, T = x.shape
    if B and T:
        block = _kl_block(T)
        col_blocks = triton.cdiv(T, block)
        whiten_kernel[(B * col_blocks,)](x, _as_kernel_mask(mask), out, whiten_map, T, x.stride(0), mask.stride(0),
                                         col_blocks, BLOCK_T=block)


def masked_whiten_fwd(x, mask, shift_mean, unbiased, eps):
    B, T = x.shape
    acc = _acc(x.dtype)
    out = torch.empty(B, T, dtype=acc, device=x.device)
    stats = torch.zeros(B, 3, dtype=torch.float64, device=x.device)
    if B and T:
        block_b, block_t = _scan_blocks(T)
        row_moments_kernel[(triton.cdiv(B, block_b),)](x, _as_kernel_mask(mask), stats, B, T, x.stride(0),
                                                       mask.stride(0), BLOCK_B=block_b, BLOCK_T=block_t,
                                                       num_warps=SCAN_WARPS)
    _whiten_into(x, mask, out, _whiten_map(stats, shift_mean, unbiased, eps, acc))
    return out


def ppo_advantages_fwd(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, estimator, lo, hi,
                       out_lo, out_hi, whiten):
    B, T = logprobs.shape
    acc = _acc(logprobs.dtype)
    adv, ret, rewards, kl = (torch.empty(B, T, dtype=acc, device=logprobs.device) for _ in range(4))
    stats = torch.zeros(B, 3, dtype=torch.float64, device=logprobs.device)
    if B and T:
        block_b, block_t = _scan_blocks(T)
        ppo_advantages_kernel[(triton.cdiv(B, block_b),)](
            scores, logprobs, ref_logprobs, values, _as_kernel_mask(mask), adv, ret, rewards, kl, stats,
            B, T, logprobs.stride(0), ref_logprobs.stride(0), values.stride(0), mask.stride(0),
            *_halves(-kl_coef), *_halves(gamma), *_halves(gamma * lam), _bound(lo), _bound(hi), _bound(out_lo), _bound(out_hi),
            ESTIMATOR=estimator, WHITEN=whiten, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=SCAN_WARPS)
    if whiten:
        _whiten_into(adv, mask, adv, _whiten_map(stats, True, True, 1e-8, acc))
    return adv, ret, rewards, kl


# ---- clipped losses ----------------------------------------------------------------------------


@triton.jit
def _policy_token(lp, old, adv, ratio_lo, ratio_hi, dual, HAS_DUAL: tl.constexpr, LIMIT: tl.constexpr):
    """Per-token policy loss, its branch indicators, the log-ratio and d loss / d logprobs."""
    raw = lp - old
    log_ratio = tl.minimum(tl.maximum(raw, -LIMIT), LIMIT)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    loss = tl.maximum(unclipped, clipped)
    grad = _max_grad(unclipped, clipped, unclipped, tl.where((ratio >= ratio_lo) & (ratio <= ratio_hi), unclipped, 0.0))
    dual_hit = tl.zeros_like(loss) != 0
    if HAS_DUAL:
        bound = -adv * dual
        negative = adv < 0
        dual_hit = negative & (loss > bound)
        grad = tl.where(negative, tl.where(loss < bound, grad, tl.where(loss == bound, 0.5 * grad, 0.0)), grad)
        loss = tl.where(negative, tl.minimum(loss, bound), loss)
    grad = tl.where((raw >= -LIMIT) & (raw <= LIMIT), grad, 0.0)
    return loss, clipped > unclipped, dual_hit, log_ratio, grad


@triton.jit
def _value_token(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    """Per-token value loss, whether the clipped term is the larger, and d loss / d values."""
    err = v - ret
    unclipped = err * err
    if HAS_CLIP:
        lo = old - clip
        hi = old + clip
        clipped_err = tl.minimum(tl.maximum(v, lo), hi) - ret
        clipped = clipped_err * clipped_err
        loss = 0.5 * tl.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
        grad = _max_grad(unclipped, clipped, err, tl.where((v >= lo) & (v <= hi), clipped_err, 0.0))
    else:
        loss = 0.5 * unclipped
        is_clipped = tl.zeros_like(loss) != 0
        grad = err
    return loss, is_clipped, grad


@triton.jit
def _loss_token(x, y, z, p0, p1, p2, KIND: tl.constexpr, OPTION: tl.constexpr, LIMIT: tl.constexpr):
    """KIND 0 (policy): (x, y, z) = (logprobs, old, advantages), p0..p2 = ratio bounds and the dual-clip
    bound (OPTION: dual clip on). KIND 1 (value): (values, old values, returns), p0 = clip (OPTION:
    clip on). Returns the loss, four statistics (policy: clipped, dual-clipped, k3 and k1 of
    KL(old || new); value: clipped, then zeros) and d loss / d x."""
    zero = tl.zeros_like(x)
    if KIND == 0:
        loss, clipped, dual_hit, log_ratio, grad = _policy_token(x, y, z, p0, p1, p2, OPTION, LIMIT)
        s0 = tl.where(clipped, zero + 1.0, zero)
        s1 = tl.where(dual_hit, zero + 1.0, zero)
        s2 = _exp_minus_1_minus_x(log_ratio)
        s3 = -log_ratio
    else:
        loss, clipped, grad = _value_token(x, y, z, p0, OPTION)
        s0 = tl.where(clipped, zero + 1.0, zero)
        s1 = zero
        s2 = zero
        s3 = zero
    return loss, s0, s1, s2, s3, grad


@triton.jit
def loss_fwd_kernel(
    x_ptr, y_ptr, z_ptr, mask_ptr, partials_ptr,
    T, stride_x, stride_y, stride_z, stride_m, p0, p1, p2,
    KIND: tl.constexpr, OPTION: tl.constexpr, LIMIT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per row: (loss sum, response tokens, four statistic sums) into partials (B, 6)."""
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = partials_ptr.dtype.element_ty
    sums = tl.zeros((BLOCK_T,), acc_dtype)
    count = tl.zeros((BLOCK_T,), acc_dtype)
    s0 = tl.zeros((BLOCK_T,), acc_dtype)
    s1 = tl.zeros((BLOCK_T,), acc_dtype)
    s2 = tl.zeros((BLOCK_T,), acc_dtype)
    s3 = tl.zeros((BLOCK_T,), acc_dtype)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        in_row = cols < T
        valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + row * stride_y + cols, mask=in_row, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + row * stride_z + cols, mask=in_row, other=0.0).to(acc_dtype)
        loss, t0, t1, t2, t3, _ = _loss_token(x, y, z, p0, p1, p2, KIND, OPTION, LIMIT)
        sums += tl.where(valid, loss, 0.0)
        count += valid.to(acc_dtype)
        s0 += tl.where(valid, t0, 0.0)
        s1 += tl.where(valid, t1, 0.0)
        s2 += tl.where(valid, t2, 0.0)
        s3 += tl.where(valid, t3, 0.0)
    out = partials_ptr + row * 6
    tl.store(out, tl.sum(sums, axis=0))
    tl.store(out + 1, tl.sum(count, axis=0))
    tl.store(out + 2, tl.sum(s0, axis=0))
    tl.store(out + 3, tl.sum(s1, axis=0))
    tl.store(out + 4, tl.sum(s2, axis=0))
    tl.store(out + 5, tl.sum(s3, axis=0))


@triton.jit
def loss_bwd_kernel(
    grad_loss_ptr, x_ptr, y_ptr, z_ptr, mask_ptr, weights_ptr, out_ptr,
    T, stride_x, stride_y, stride_z, stride_m, col_blocks, p0, p1, p2,
    KIND: tl.constexpr, OPTION: tl.constexpr, LIMIT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    scale = tl.load(grad_loss_ptr) * tl.load(weights_ptr + row)
    acc_dtype = scale.dtype
    valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
    y = tl.load(y_ptr + row * stride_y + cols, mask=in_row, other=0.0).to(acc_dtype)
    z = tl.load(z_ptr + row * stride_z + cols, mask=in_row, other=0.0).to(acc_dtype)
    _, _, _, _, _, grad = _loss_token(x, y, z, p0, p1, p2, KIND, OPTION, LIMIT)
    tl.store(out_ptr + row * T + cols, tl.where(valid, scale * grad, 0.0).to(out_ptr.dtype.element_ty), mask=in_row)


def _finish(partials: torch.Tensor, agg: int, n_stats: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Row weights and the weighted loss from per-row partial sums (same rules as csrc/cpu/ppo_losses.cpp)."""
    p = partials.double()
    counts = p[:, 1]
    tokens = counts.sum()
    rows = (counts > 0).sum().double()
    if agg == 0:
        weights = (1.0 / tokens.clamp(min=1)).expand_as(counts) * (tokens > 0)
    elif agg == 1:
        weights = torch.where(counts > 0, 1.0 / (counts.clamp(min=1) * rows.clamp(min=1)), 0.0)
    else:
        weights = torch.where(counts > 0, 1.0 / rows.clamp(min=1), 0.0)
    loss = (weights * p[:, 0]).sum()
    stats = p[:, 2:1 + n_stats].sum(0) / tokens.clamp(min=1)
    return torch.cat([loss[None], stats]).to(dtype), weights.to(dtype).contiguous()


def _loss_block(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 16)), 1024)


def _has_option(kind: int, p0: float, p2: float) -> bool:
    return p2 > 0 if kind == 0 else p0 >= 0  # policy: dual clip given; value: clip given


def ppo_loss_fwd(x, y, z, mask, kind, p0, p1, p2, agg):
    """Same contract as torch.ops.cai_kernels_cpu.ppo_loss_fwd: (stats, row_weights)."""
    B, T = x.shape
    acc = _acc(x.dtype)
    partials = torch.zeros(B, 6, dtype=acc, device=x.device)
    if B:
        loss_fwd_kernel[(B,)](
            x, y, z, _as_kernel_mask(mask), partials, T, x.stride(0), y.stride(0), z.stride(0), mask.stride(0),
            p0, p1, max(p2, 0.0), KIND=kind, OPTION=_has_option(kind, p0, p2), LIMIT=LOG_RATIO_LIMIT,
            BLOCK_T=_loss_block(T))
    return _finish(partials, agg, 5 if kind == 0 else 2, acc)


def ppo_loss_bwd(grad_loss, x, y, z, mask, row_weights, kind, p0, p1, p2):
    """Same contract as torch.ops.cai_kernels_cpu.ppo_loss_bwd: d loss / d x in x's dtype."""
    B, T = x.shape
    out = torch.empty(B, T, dtype=x.dtype, device=x.device)
    if B and T:
        block = _loss_block(T)
        col_blocks = triton.cdiv(T, block)
        loss_bwd_kernel[(B * col_blocks,)](
            grad_loss.to(row_weights.dtype), x, y, z, _as_kernel_mask(mask), row_weights, out, T, x.stride(0),
            y.stride(0), z.stride(0), mask.stride(0), col_blocks, p0, p1, max(p2, 0.0), KIND=kind,
            OPTION=_has_option(kind, p0, p2), LIMIT=LOG_RATIO_LIMIT, BLOCK_T=block)
    return out


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    kl_scalars = {"inner": "i64", "lp_stride_outer": "i64", "lp_stride_inner": "i64", "ref_stride_outer": "i64",
                  "ref_stride_inner": "i64", "T": "i64", "col_blocks": "i64", "lo": "fp32", "hi": "fp32",
                  "out_lo": "fp32", "out_hi": "fp32", "ESTIMATOR": "constexpr", "BACKWARD": "constexpr",
                  "BLOCK_T": "constexpr"}
    kl_aligned = ("lp_ptr", "ref_ptr", "out_ptr", "lp_stride_outer", "lp_stride_inner", "ref_stride_outer",
                  "ref_stride_inner", "T")
    scan_flags = {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_T": SCAN_BLOCK_T}
    for dtype in ("bf16", "fp32"):
        for backward in (False, True):
            specs.append(AotSpec(
                "kl_penalty_kernel", {"lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "grad_ptr": "*fp32",
                                      "out_ptr": f"*{dtype}" if backward else "*fp32"} | kl_scalars,
                {"ESTIMATOR": 2, "BACKWARD": backward, "BLOCK_T": 1024}, aligned=kl_aligned + ("grad_ptr",),
                label=f"{dtype}+k3{'+backward' if backward else ''}"))
        specs.append(AotSpec(
            "gae_kernel",
            {"rewards_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "mask_ptr": "*u8", "adv_ptr": "*fp32",
             "ret_ptr": "*fp32", "B": "i64", "T": "i64", "stride_r": "i64", "stride_v": "i64", "stride_m": "i64",
             "gamma_hi": "fp32", "gamma_lo": "fp32", "gamma_lambda_hi": "fp32",
             "gamma_lambda_lo": "fp32", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"},
            scan_flags, aligned=("rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr", "T", "stride_r",
                                 "stride_v", "stride_m"), num_warps=SCAN_WARPS, label=dtype))
        specs.append(AotSpec(
            "ppo_advantages_kernel",
            {"scores_ptr": "*fp32", "lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "values_ptr": f"*{dtype}",
             "mask_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "rewards_ptr": "*fp32", "kl_ptr": "*fp32",
             "stats_ptr": "*fp64", "B": "i64", "T": "i64", "stride_lp": "i64", "stride_ref": "i64",
             "stride_v": "i64", "stride_m": "i64", "neg_kl_coef_hi": "fp32", "neg_kl_coef_lo": "fp32", "gamma_hi": "fp32",
             "gamma_lo": "fp32", "gamma_lambda_hi": "fp32", "gamma_lambda_lo": "fp32",
             "lo": "fp32", "hi": "fp32", "out_lo": "fp32", "out_hi": "fp32", "ESTIMATOR": "constexpr",
             "WHITEN": "constexpr", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"},
            {"ESTIMATOR": 2, "WHITEN": True} | scan_flags,
            aligned=("scores_ptr", "lp_ptr", "ref_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr", "rewards_ptr",
                     "kl_ptr", "stats_ptr", "T", "stride_lp", "stride_ref", "stride_v", "stride_m"),
            num_warps=SCAN_WARPS, label=f"{dtype}+k3+whiten"))
        loss_scalars = {"T": "i64", "stride_x": "i64", "stride_y": "i64", "stride_z": "i64", "stride_m": "i64",
                        "p0": "fp32", "p1": "fp32", "p2": "fp32", "KIND": "constexpr", "OPTION": "constexpr",
                        "LIMIT": "constexpr", "BLOCK_T": "constexpr"}
        loss_inputs = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "mask_ptr": "*u8"}
        loss_aligned = ("x_ptr", "y_ptr", "z_ptr", "mask_ptr", "T", "stride_x", "stride_y", "stride_z", "stride_m")
        for kind, name in ((0, "policy+dual"), (1, "value+clip")):
            flags = {"KIND": kind, "OPTION": True, "LIMIT": LOG_RATIO_LIMIT, "BLOCK_T": 1024}
            specs.append(AotSpec("loss_fwd_kernel", loss_inputs | {"partials_ptr": "*fp32"} | loss_scalars, flags,
                                 aligned=loss_aligned + ("partials_ptr",), label=f"{dtype}+{name}"))
            specs.append(AotSpec(
                "loss_bwd_kernel",
                {"grad_loss_ptr": "*fp32"} | loss_inputs | {"weights_ptr": "*fp32", "out_ptr": f"*{dtype}"}
                | loss_scalars | {"col_blocks": "i64"}, flags, aligned=loss_aligned + ("out_ptr",),
                label=f"{dtype}+{name}"))
    specs.append(AotSpec(
        "row_moments_kernel",
        {"x_ptr": "*fp32", "mask_ptr": "*u8", "stats_ptr": "*fp64", "B": "i64", "T": "i64", "stride_x": "i64",
         "stride_m": "i64", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"},
        scan_flags, aligned=("x_ptr", "mask_ptr", "stats_ptr", "T", "stride_x", "stride_m"), num_warps=SCAN_WARPS,
        label="fp32"))
    specs.append(AotSpec(
        "whiten_kernel",
        {"x_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp32", "map_ptr": "*fp32", "T": "i64", "stride_x": "i64",
         "stride_m": "i64", "col_blocks": "i64", "BLOCK_T": "constexpr"},
        {"BLOCK_T": 1024}, aligned=("x_ptr", "mask_ptr", "out_ptr", "map_ptr", "T", "stride_x", "stride_m"),
        label="fp32"))
    return specs


AOT_SPECS = _aot_specs()
