"""Triton kernels of masked_whiten: per-row moments over response tokens, then one pass that merges them and
normalizes (``_whiten.py``): two launches. Same contract as csrc/cpu/masked_whiten.cpp.
"""

from __future__ import annotations

import torch
import triton

from .._params import MaskedWhitenParams
from .._validation import accumulate_dtype
from ._gae_scan import SCAN_BLOCK_B, SCAN_BLOCK_T, SCAN_WARPS, scan_blocks
from ._launch import as_kernel_mask
from ._whiten import MERGE_BLOCK, row_moments_kernel, whiten_kernel, whiten_rows


def masked_whiten_fwd(x: torch.Tensor, mask: torch.Tensor, params: MaskedWhitenParams) -> torch.Tensor:
    """Same contract as the C++ kernel: (B, T) fp32 (fp64 for fp64 x), 0 on masked positions."""
    B, T = x.shape
    acc = accumulate_dtype(x.dtype)
    out = torch.empty(B, T, dtype=acc, device=x.device)
    stats = torch.empty(B, 3, dtype=torch.float64, device=x.device)  # every row written by the moments kernel
    mask = as_kernel_mask(mask)  # once for both launches (a bool mask's uint8 view is a ~1.5 us call)
    if B and T:
        block_b, block_t = scan_blocks(T)
        row_moments_kernel[(-(-B // block_b),)](x, mask, stats, B, T, x.stride(0),
                                                mask.stride(0), BLOCK_B=block_b, BLOCK_T=block_t,
                                                num_warps=SCAN_WARPS)
    whiten_rows(x, mask, out, stats, shift_mean=params.shift_mean, unbiased=params.unbiased, eps=params.eps)
    return out


def _aot_specs():
    from ._aot import AotSpec

    return [
        AotSpec("row_moments_kernel", {"x_ptr": "*fp32", "mask_ptr": "*u8", "stats_ptr": "*fp64"},
                {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_T": SCAN_BLOCK_T},
                aligned=("x_ptr", "mask_ptr", "stats_ptr", "T", "stride_x", "stride_m"), num_warps=SCAN_WARPS,
                label="fp32"),
        AotSpec("whiten_kernel", {"x_ptr": "*fp32", "mask_ptr": "*u8", "out_ptr": "*fp32", "stats_ptr": "*fp64",
                                  "eps_hi": "fp32", "eps_lo": "fp32"},
                {"SHIFT_MEAN": True, "UNBIASED": True, "BLOCK_T": 1024, "MERGE": MERGE_BLOCK},
                aligned=("x_ptr", "mask_ptr", "out_ptr", "stats_ptr", "T", "stride_x", "stride_m"), label="fp32"),
    ]


AOT_SPECS = _aot_specs()
