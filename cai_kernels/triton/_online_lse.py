"""Shared math of the log-prob kernels (token_logprobs, linear_token_logprobs): the online
log-sum-exp of a row streamed in blocks, and the per-block gradient of the log-probs w.r.t. the logits.

With z = x / T:
    lse     = log sum_k exp(z_k)          (online: m' = max(m, max_blk z), s' = s e^(m-m') + sum e^(z-m');
                                           pieces of a row merge the same way: merge_lse_partials)
    log p_t = z_t - lse
    H       = lse - sum_k p_k z_k         (w = sum e^(z-m) (z-m) rides along: H = log s - w / s)
    dL/dx_k = ([k == t] g - p_k (g + h (z_k - mu))) / T,   mu = lse - H
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import pow2_block


@triton.jit
def online_lse_step(m, s, w, z, WITH_ENTROPY: tl.constexpr):
    """Folds a block z of one row into its running (m, s, w) = (max, sum e^(z-m), sum e^(z-m) (z-m))."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)
    if WITH_ENTROPY:
        # rebase w to m_new: sum e' (z - m') = alpha * (w + s (m - m')); 0 * -inf must stay 0
        w = tl.where(s > 0, alpha * (w + s * (m - m_ref)), 0.0)
        w += tl.sum(tl.where(e > 0, e * (z - m_ref), 0.0), axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, w


@triton.jit
def merge_lse_partials(m_p, s_p, w_p, WITH_ENTROPY: tl.constexpr):
    """Merges [pieces, rows] partial (m, s, w) of one row split into pieces (each from online_lse_step
    over its columns) along axis 0 into each row's (m, s, w): m = max m_p, s = sum s_p e^(m_p - m),
    w = sum e^(m_p - m) (w_p + s_p (m_p - m)). A piece that saw only -inf, (-inf, 0, 0), adds 0; a NaN
    in s_p or w_p reaches s and w."""
    m = tl.max(m_p, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # every piece -inf: avoid -inf - -inf
    alpha = tl.exp(m_p - m_ref[None, :])
    s = tl.sum(s_p * alpha, axis=0)
    w = tl.zeros_like(s)
    if WITH_ENTROPY:
        w = tl.sum(tl.where(s_p > 0, alpha * (w_p + s_p * (m_p - m_ref[None, :])), 0.0), axis=0)
    return m, s, w


@triton.jit
def logits_grad(z, is_target, g, h, lse, mu, inv_temperature, WITH_ENTROPY: tl.constexpr):
    """dL/dx for a block of z = x / T: ([k == t] g - p_k (g + h (z_k - mu))) / T, in fp32: the target's
    (1 - p) is formed before the one rounding to the output dtype."""
    p = tl.exp(z - lse)
    coef = g
    if WITH_ENTROPY:
        coef = g + h * tl.where(p > 0, z - mu, 0.0)
    return (tl.where(is_target, g, 0.0) - p * coef) * inv_temperature


@triton.jit
def targets_of_rows(targets_ptr, rows, n_rows, V, ignore_index, HAS_IGNORE: tl.constexpr):
    """(in_rows, target, active, in_range) of a block of rows: active = in the tensor and not ignored;
    in_range = 0 <= target < V (an active row outside it is bad data: NaN, nothing read at the target)."""
    in_rows = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=in_rows, other=0)
    active = in_rows
    if HAS_IGNORE:
        active = in_rows & (target != ignore_index)
    in_range = (target >= 0) & (target < V)
    return in_rows, target, active, in_range


@triton.jit
def grad_row_scalars(row, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr, entropy_ptr, ignore_index,
                     HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """The per-row scalars of the backward: (target, active, g, h, lse, mu); an ignored row has
    g = h = 0 (it reads nothing and writes zeros)."""
    target = tl.load(targets_ptr + row)
    active = target >= 0
    if HAS_IGNORE:
        active = target != ignore_index
    g = tl.where(active, tl.load(grad_logp_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    h = tl.zeros((), lse.dtype)
    mu = tl.zeros((), lse.dtype)
    if WITH_ENTROPY:
        h = tl.where(active, tl.load(grad_entropy_ptr + row), 0.0)
        mu = lse - tl.load(entropy_ptr + row)
    return target, active, g, h, lse, mu


def block_v(width: int) -> int:
    """Vocabulary entries per step of a row loop."""
    return pow2_block(width, 4096)


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def ignore_args(ignore_index: int | None) -> tuple[int, bool]:
    """(ignore_index, HAS_IGNORE) as the kernels take them: the index is read only when HAS_IGNORE."""
    return (0, False) if ignore_index is None else (ignore_index, True)
