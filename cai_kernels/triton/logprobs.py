"""Triton kernels for the log-prob family: per-token log-probs and entropy, forward and backward.

One program per row of a (outer, inner, V) logits view (see ``cai_kernels/ops/_layout.py``); the
row is streamed in blocks of BLOCK_V with an online log-sum-exp, so nothing of size V is kept.
With z = x / T:
    lse     = log sum_k exp(z_k)          (online: m' = max(m, max_blk z), s' = s e^(m-m') + sum e^(z-m'))
    log p_t = z_t - lse
    H       = lse - sum_k p_k z_k         (w = sum e^(z-m) (z-m) rides along: H = log s - w / s)
    dL/dx_k = ([k == t] g - p_k (g + h (z_k - mu))) / T,   mu = lse - H
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.logprobs import accumulate_dtype


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
def logits_grad(z, is_target, g, h, lse, mu, inv_temperature, WITH_ENTROPY: tl.constexpr):
    """dL/dx for a block of z = x / T: ([k == t] g - p_k (g + h (z_k - mu))) / T, in fp32: the target's
    (1 - p) is formed before the one rounding to the output dtype."""
    p = tl.exp(z - lse)
    coef = g
    if WITH_ENTROPY:
        coef = g + h * tl.where(p > 0, z - mu, 0.0)
    return (tl.where(is_target, g, 0.0) - p * coef) * inv_temperature


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


@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    inner, stride_outer, stride_inner, V,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows * V may exceed 2^31
    target = tl.load(targets_ptr + row)
    active = target >= 0  # the wrapper has checked the range; negatives here are ignore_index
    if HAS_IGNORE:
        active = target != ignore_index
    read_end = tl.where(active, V, 0)  # an ignored row reads nothing
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    acc_dtype = lse_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits

    m = tl.full((), float("-inf"), acc_dtype)  # running max of z
    s = tl.zeros((), acc_dtype)                 # sum exp(z - m)
    w = tl.zeros((), acc_dtype)                 # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(acc_dtype) * inv_temperature
        m, s, w = online_lse_step(m, s, w, z, WITH_ENTROPY)

    safe_target = tl.where(active, target, 0)
    z_target = tl.load(row_ptr + safe_target, mask=active, other=0.0).to(acc_dtype) * inv_temperature
    lse = m + tl.log(s)
    tl.store(logp_ptr + row, tl.where(active, z_target - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, tl.log(s) - w / s, 0.0))


@triton.jit
def token_logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_ptr,
    inner, stride_outer, stride_inner, V,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target, active, g, h, lse, mu = grad_row_scalars(row, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr,
                                                     entropy_ptr, ignore_index, HAS_IGNORE, WITH_ENTROPY)
    read_end = tl.where(active, V, 0)
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    grad_row_ptr = grad_ptr + row * V
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(lse.dtype) * inv_temperature
        grad = logits_grad(z, cols == target, g, h, lse, mu, inv_temperature, WITH_ENTROPY)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(max(V, 16)), 4096)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, ignore_index: int,
                       has_ignore: bool, with_entropy: bool):
    """Same contract as torch.ops.cai_kernels_cpu.token_logprobs_fwd: logits (outer, inner, V) with
    stride(2) == 1, targets (rows,) int64 already range-checked. Returns (logp, entropy, lse)."""
    n_rows, V = targets.numel(), logits.size(2)
    acc = accumulate_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=acc, device=logits.device)
    if n_rows:
        block_v = _block_v(V)
        token_logprobs_fwd_kernel[(n_rows,)](
            logits, targets, logp, entropy, lse,
            logits.size(1), logits.stride(0), logits.stride(1), V,
            inv_temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )
    return logp, entropy, lse


def token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
                       targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, inv_temperature: float,
                       ignore_index: int, has_ignore: bool) -> torch.Tensor:
    """Same contract as torch.ops.cai_kernels_cpu.token_logprobs_bwd: the (outer, inner, V) gradient."""
    n_rows, V = targets.numel(), logits.size(2)
    grad = torch.empty((logits.size(0), logits.size(1), V), dtype=logits.dtype, device=logits.device)
    with_entropy = grad_entropy.numel() > 0
    if n_rows:
        block_v = _block_v(V)
        token_logprobs_bwd_kernel[(n_rows,)](
            grad_logp, grad_entropy if with_entropy else grad_logp, logits, targets, lse,
            entropy if with_entropy else lse, grad,
            logits.size(1), logits.stride(0), logits.stride(1), V,
            inv_temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )
    return grad


def _aot_specs():
    from ._aot import AotSpec

    common = {"inner": "i64", "stride_outer": "i64", "stride_inner": "i64", "V": "i64",
              "inv_temperature": "fp32", "ignore_index": "i64",
              "HAS_IGNORE": "constexpr", "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"}
    specs = []
    for dtype, entropy in (("bf16", True), ("fp32", False), ("fp16", False)):
        flags = {"HAS_IGNORE": True, "WITH_ENTROPY": entropy, "BLOCK_V": 4096}
        label = f"{dtype}{'+entropy' if entropy else ''}"
        specs.append(AotSpec(
            "token_logprobs_fwd_kernel",
            {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
             "lse_ptr": "*fp32"} | common, flags,
            aligned=("logits_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "stride_outer",
                     "stride_inner", "V"),
            num_warps=_num_warps(4096), label=label))
        specs.append(AotSpec(
            "token_logprobs_bwd_kernel",
            {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "logits_ptr": f"*{dtype}",
             "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_ptr": f"*{dtype}"} | common,
            flags,
            aligned=("grad_logp_ptr", "grad_entropy_ptr", "logits_ptr", "targets_ptr", "lse_ptr", "entropy_ptr",
                     "grad_ptr", "stride_outer", "stride_inner", "V"),
            num_warps=_num_warps(4096), label=label))
    return specs


AOT_SPECS = _aot_specs()
