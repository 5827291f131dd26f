"""Triton kernel of gae: GAE as one chunked reverse scan per block of rows (``_gae_scan.py``).

(B, T) inputs with a unit stride along T and any row stride; contiguous outputs; masks read in their own
dtype (bool as uint8), masked positions through ``tl.where`` (NaN or inf there cannot leak). Same
contract as csrc/cpu/gae.cpp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import GaeParams
from .._validation import accumulate_dtype
from ._gae_scan import (SCAN_BLOCK_B, SCAN_BLOCK_T, SCAN_WARPS, gae_tile, halves, load_values_tile,
                        scan_blocks, scan_start)
from ._launch import as_kernel_mask, cdiv


@triton.jit
def gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    B, T, stride_r, stride_v, stride_m, gamma_hi, gamma_lo, gamma_lambda_hi, gamma_lambda_lo,
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    acc_dtype = adv_ptr.dtype.element_ty
    gamma, gamma_lambda, next_value, running = scan_start(gamma_hi, gamma_lo, gamma_lambda_hi, gamma_lambda_lo,
                                                          acc_dtype, BLOCK_B)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside, value, valid, value_next, valid_next = load_values_tile(
            values_ptr, mask_ptr, rows, cols, row_ok, T, stride_v, stride_m, acc_dtype, BLOCK_T)
        reward = tl.load(rewards_ptr + rows[:, None] * stride_r + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        advantages, returns, next_value, running = gae_tile(
            reward, value, valid, value_next, valid_next, next_value, running, gamma, gamma_lambda)
        out = rows[:, None] * T + cols[None, :]
        tl.store(adv_ptr + out, advantages, mask=inside)
        tl.store(ret_ptr + out, returns, mask=inside)


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, params: GaeParams):
    """Same contract as the C++ kernel: (advantages, returns), (B, T) fp32 (fp64), 0 on masked positions."""
    B, T = rewards.shape
    acc = accumulate_dtype(rewards.dtype)
    adv = torch.empty(B, T, dtype=acc, device=rewards.device)
    ret = torch.empty(B, T, dtype=acc, device=rewards.device)
    if B and T:
        block_b, block_t = scan_blocks(T)
        gae_kernel[(cdiv(B, block_b),)](
            rewards, values, as_kernel_mask(mask), adv, ret, B, T, rewards.stride(0), values.stride(0),
            mask.stride(0), *halves(params.gamma), *halves(params.gamma * params.lam), BLOCK_B=block_b,
            BLOCK_T=block_t, num_warps=SCAN_WARPS)
    return adv, ret


def _aot_specs():
    from ._aot import AotSpec

    return [AotSpec(
        "gae_kernel",
        {"rewards_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "mask_ptr": "*u8", "adv_ptr": "*fp32",
         "ret_ptr": "*fp32", "gamma_hi": "fp32", "gamma_lo": "fp32", "gamma_lambda_hi": "fp32",
         "gamma_lambda_lo": "fp32"},
        {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_T": SCAN_BLOCK_T},
        aligned=("rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr", "T", "stride_r", "stride_v",
                 "stride_m"), num_warps=SCAN_WARPS, label=dtype) for dtype in ("bf16", "fp32")]


AOT_SPECS = _aot_specs()
