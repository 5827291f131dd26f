"""Triton kernel of ppo_advantages: KL, reward shaping and the GAE scan in one pass over each block of rows,
each row's advantage moments taken while its output is fresh, then one whitening pass (``_whiten.py``).
Same contract as csrc/cpu/ppo_advantages.cpp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import PpoAdvantagesParams
from .._validation import accumulate_dtype
from ._gae_scan import (SCAN_BLOCK_B, SCAN_BLOCK_T, SCAN_WARPS, gae_tile, halves, load_values_tile, scalar,
                        scan_blocks, scan_start)
from ._kl_math import kl_bounds, kl_forward
from ._launch import as_kernel_mask
from ._whiten import row_moments, whiten_rows


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
    neg_kl_coef = scalar(neg_kl_coef_hi, neg_kl_coef_lo, acc_dtype)
    gamma, gamma_lambda, next_value, running = scan_start(gamma_hi, gamma_lo, gamma_lambda_hi, gamma_lambda_lo,
                                                          acc_dtype, BLOCK_B)
    score = tl.load(scores_ptr + rows, mask=row_ok, other=0.0)
    seen = tl.zeros((BLOCK_B,), tl.int32)  # a later response token exists: the score is placed
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(n_chunks):
        cols = (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
        inside, value, valid, value_next, valid_next = load_values_tile(
            values_ptr, mask_ptr, rows, cols, row_ok, T, stride_v, stride_m, acc_dtype, BLOCK_T)
        lp = tl.load(lp_ptr + rows[:, None] * stride_lp + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        ref = tl.load(ref_ptr + rows[:, None] * stride_ref + cols[None, :], mask=inside, other=0.0).to(acc_dtype)
        kl = tl.where(valid, kl_forward(lp - ref, lo, hi, out_lo, out_hi, ESTIMATOR), 0.0)
        # the row's last response token: the last valid step of this tile if none came later
        later = tl.cumsum(valid.to(tl.int32), axis=1, reverse=True)
        is_last = valid & (later == 1) & (seen == 0)[:, None]
        seen = seen + tl.sum(valid.to(tl.int32), axis=1)
        reward = tl.where(valid, neg_kl_coef * kl, 0.0) + tl.where(is_last, score[:, None], 0.0)
        advantages, returns, next_value, running = gae_tile(
            reward, value, valid, value_next, valid_next, next_value, running, gamma, gamma_lambda)
        out = rows[:, None] * T + cols[None, :]
        tl.store(kl_ptr + out, kl, mask=inside)
        tl.store(rewards_ptr + out, reward, mask=inside)
        tl.store(adv_ptr + out, advantages, mask=inside)
        tl.store(ret_ptr + out, returns, mask=inside)
    if WHITEN:
        tl.debug_barrier()  # the moments re-read advantages other threads of this program wrote
        row_moments(adv_ptr, mask_ptr, stats_ptr, rows, row_ok, T, T, stride_m, BLOCK_T)


def ppo_advantages_fwd(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       values: torch.Tensor, mask: torch.Tensor, params: PpoAdvantagesParams):
    """Same contract as the C++ kernel: (advantages, returns, token_rewards, kl), (B, T) fp32 (fp64)."""
    B, T = logprobs.shape
    acc = accumulate_dtype(logprobs.dtype)
    adv, ret, rewards, kl = (torch.empty(B, T, dtype=acc, device=logprobs.device) for _ in range(4))
    stats = torch.empty(B, 3, dtype=torch.float64, device=logprobs.device)  # every row written with WHITEN
    mask = as_kernel_mask(mask)  # once for both launches (a bool mask's uint8 view is a ~1.5 us call)
    if B and T:
        block_b, block_t = scan_blocks(T)
        ppo_advantages_kernel[(-(-B // block_b),)](
            scores, logprobs, ref_logprobs, values, mask, adv, ret, rewards, kl, stats,
            B, T, logprobs.stride(0), ref_logprobs.stride(0), values.stride(0), mask.stride(0),
            *halves(-params.kl_coef), *halves(params.gamma), *halves(params.gamma * params.lam), *kl_bounds(params),
            ESTIMATOR=int(params.estimator), WHITEN=params.whiten, BLOCK_B=block_b, BLOCK_T=block_t,
            num_warps=SCAN_WARPS)
    if params.whiten:
        whiten_rows(adv, mask, adv, stats, shift_mean=True, unbiased=True, eps=1e-8)
    return adv, ret, rewards, kl


def _aot_specs():
    from ._aot import AotSpec

    return [AotSpec(
        "ppo_advantages_kernel",
        {"scores_ptr": "*fp32", "lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "values_ptr": f"*{dtype}",
         "mask_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "rewards_ptr": "*fp32", "kl_ptr": "*fp32",
         "stats_ptr": "*fp64", "neg_kl_coef_hi": "fp32", "neg_kl_coef_lo": "fp32", "gamma_hi": "fp32",
         "gamma_lo": "fp32", "gamma_lambda_hi": "fp32", "gamma_lambda_lo": "fp32", "lo": "fp32", "hi": "fp32",
         "out_lo": "fp32", "out_hi": "fp32"},
        {"ESTIMATOR": 2, "WHITEN": True, "BLOCK_B": SCAN_BLOCK_B, "BLOCK_T": SCAN_BLOCK_T},
        aligned=("scores_ptr", "lp_ptr", "ref_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr", "rewards_ptr",
                 "kl_ptr", "stats_ptr", "T", "stride_lp", "stride_ref", "stride_v", "stride_m"),
        num_warps=SCAN_WARPS, label=f"{dtype}+k3+whiten") for dtype in ("bf16", "fp32")]


AOT_SPECS = _aot_specs()
