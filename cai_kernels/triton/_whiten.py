"""Shared machinery of the whitening kernels (masked_whiten, ppo_advantages): per-row moments (count, mean,
M2; two passes over the row), merged in fp64 (Chan et al.), then one normalizing pass. The C++ kernels do the
same (csrc/cpu/whiten.h).

Two launches: the moments (``row_moments``, inside the caller's kernel), then ``whiten_kernel``, whose
programs each merge all rows' moments (the same sums in the same order: identical results, no atomics, no
third launch) and then whiten their share of the rows. Its grid is capped at a few programs per SM, so the
B x 24 bytes of moments each program reads stay a small fraction of the pass over x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._gae_scan import halves, scalar
from ._launch import as_kernel_mask, split_blocks

MERGE_BLOCK = 256         # rows' moments per step of the merge
PROGRAMS_PER_SM = 4
CPU_PROGRAMS = 64         # the interpreter's cap (no SMs)


@triton.jit
def masked_tile(x_ptr, mask_ptr, rows, cols, row_ok, T, stride_x, stride_m, acc_dtype: tl.constexpr):
    """(valid, x) of a (rows, cols) tile: the response mask as bool and x in acc_dtype (0 outside the tensor)."""
    inside = row_ok[:, None] & (cols < T)[None, :]
    valid = tl.load(mask_ptr + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0) != 0
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
    return valid, x


@triton.jit
def row_moments(x_ptr, mask_ptr, stats_ptr, rows, row_ok, T, stride_x, stride_m, BLOCK_T: tl.constexpr):
    """Per row: (count, mean, M2) of x over response tokens, two passes; stats is (B, 3)."""
    acc_dtype = stats_ptr.dtype.element_ty  # fp64: a sum of values like 1e4 +- 1 keeps the mean exact
    count = tl.zeros((rows.shape[0],), acc_dtype)
    total = tl.zeros((rows.shape[0],), acc_dtype)
    for start in range(0, T, BLOCK_T):
        valid, x = masked_tile(x_ptr, mask_ptr, rows, start + tl.arange(0, BLOCK_T), row_ok, T, stride_x, stride_m,
                               acc_dtype)
        count += tl.sum(valid.to(acc_dtype), axis=1)
        total += tl.sum(tl.where(valid, x, 0.0), axis=1)
    mean = total / tl.maximum(count, 1.0)
    m2 = tl.zeros((rows.shape[0],), acc_dtype)
    for start in range(0, T, BLOCK_T):
        valid, x = masked_tile(x_ptr, mask_ptr, rows, start + tl.arange(0, BLOCK_T), row_ok, T, stride_x, stride_m,
                               acc_dtype)
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
def _merged_moments(stats_ptr, B, BLOCK: tl.constexpr):
    """(n, mean, M2) of the whole batch from the per-row (count, mean, M2) in stats (B, 3), in fp64."""
    n = tl.zeros((), tl.float64)
    weighted = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        count = tl.load(stats_ptr + b * 3, mask=b < B, other=0.0)
        n += tl.sum(count, axis=0)
        weighted += tl.sum(count * tl.load(stats_ptr + b * 3 + 1, mask=b < B, other=0.0), axis=0)
    mean = weighted / tl.maximum(n, 1.0)
    m2 = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        count = tl.load(stats_ptr + b * 3, mask=b < B, other=0.0)
        d = tl.load(stats_ptr + b * 3 + 1, mask=b < B, other=0.0) - mean
        m2 += tl.sum(tl.load(stats_ptr + b * 3 + 2, mask=b < B, other=0.0) + count * d * d, axis=0)
    return n, mean, m2


@triton.jit
def whiten_kernel(x_ptr, mask_ptr, out_ptr, stats_ptr, B, T, stride_x, stride_m, col_blocks, eps_hi, eps_lo,
                  SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_T: tl.constexpr,
                  MERGE: tl.constexpr):
    """out = ((x - mean_hi) - mean_lo) * scale + add_back on response tokens, 0 elsewhere, with the batch's mean
    split into its rounding mean_hi and the rounding error mean_lo (x - mean_hi is exact near the mean: large
    offsets lose nothing), scale = 1 / sqrt(var + eps), add_back = 0, or the mean without SHIFT_MEAN.
    Each program merges the moments, then takes blocks (row, BLOCK_T columns) pid, pid + programs, ..."""
    acc_dtype = out_ptr.dtype.element_ty
    n, mean, m2 = _merged_moments(stats_ptr, B, MERGE)
    if UNBIASED:
        denominator = tl.where(n > 1, n - 1, tl.maximum(n, 1.0))
    else:
        denominator = tl.maximum(n, 1.0)
    eps = scalar(eps_hi, eps_lo, tl.float64)
    scale = (1.0 / tl.sqrt(m2 / denominator + eps)).to(acc_dtype)
    mean_hi = mean.to(acc_dtype)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(acc_dtype)
    add_back = tl.zeros((), acc_dtype)
    if not SHIFT_MEAN:
        add_back = mean_hi
    zero = tl.program_id(0).to(tl.int64) * 0  # 64-bit offsets (row * stride may exceed 2^31)
    for block in range(tl.program_id(0), B * col_blocks, tl.num_programs(0)):
        row = (zero + block) // col_blocks
        cols = (block % col_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_row = cols < T
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
        valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
        tl.store(out_ptr + row * T + cols, tl.where(valid, ((x - mean_hi) - mean_lo) * scale + add_back, 0.0),
                 mask=in_row)


@functools.cache
def _programs_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


def whiten_rows(x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, *, shift_mean: bool,
                unbiased: bool, eps: float) -> None:
    """out = x whitened with the moments merged from ``stats`` (B, 3) fp64 on response tokens, 0 elsewhere (out
    may be x): one launch."""
    B, T = x.shape
    if B and T:
        block, col_blocks = split_blocks(T, 1024)
        programs = min(B * col_blocks, _programs_cap(x.device))
        whiten_kernel[(programs,)](x, as_kernel_mask(mask), out, stats, B, T, x.stride(0), mask.stride(0), col_blocks,
                                   *halves(eps), SHIFT_MEAN=shift_mean, UNBIASED=unbiased, BLOCK_T=block,
                                   MERGE=MERGE_BLOCK)
