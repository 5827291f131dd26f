"""Shared machinery of the whitening kernels (masked_whiten, ppo_advantages): per-row moments (count, mean,
M2; two passes over the row), merged on the host in fp64 (Chan et al.), then one normalizing pass. The C++
kernels do the same (csrc/cpu/whiten.h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import as_kernel_mask, pow2_block


@triton.jit
def row_moments(x_ptr, mask_ptr, stats_ptr, rows, row_ok, T, stride_x, stride_m, BLOCK_T: tl.constexpr):
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
    row_moments(x_ptr, mask_ptr, stats_ptr, rows, rows < B, T, stride_x, stride_m, BLOCK_T)


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


def whiten_map(stats: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float, dtype) -> torch.Tensor:
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


def whiten_into(x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, affine: torch.Tensor) -> None:
    """out = the whitened x on response tokens, 0 elsewhere (out may be x)."""
    B, T = x.shape
    if B and T:
        block = pow2_block(T, 1024)
        col_blocks = triton.cdiv(T, block)
        whiten_kernel[(B * col_blocks,)](x, as_kernel_mask(mask), out, affine, T, x.stride(0), mask.stride(0),
                                         col_blocks, BLOCK_T=block)
