"""Triton kernel of kl_penalty: the per-token KL estimate (``_kl_math.py``) and its gradient, one pass each.

(outer, inner, T) views with a unit stride along T in, contiguous (rows, T) out; one program per block of
BLOCK_T steps of a row, on a 1-D grid (no 65535 limit). Same contracts as csrc/cpu/kl_penalty.cpp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import KlPenaltyParams
from .._validation import accumulate_dtype
from ._kl_math import K1, K2, K3, clamp_nan, exp_minus_1_minus_x, kl_bounds, kl_forward, kl_value
from ._launch import row_layout, split_blocks


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
        r = clamp_nan(raw, lo, hi)
        kl = kl_value(r, ESTIMATOR)
        if ESTIMATOR == K1:
            d = tl.full(r.shape, 1.0, acc_dtype)
        elif ESTIMATOR == K2:
            d = r
        elif ESTIMATOR == K3:
            d = -(exp_minus_1_minus_x(-r) - r)  # 1 - e^-r = -(e^-r - 1)
        else:
            d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0)).to(acc_dtype)
        # a zero upstream gradient stays zero where d is infinite (k3 beyond exp's range)
        passes = (raw >= lo) & (raw <= hi) & (kl >= out_lo) & (kl <= out_hi) & (g != 0)
        out = tl.where(passes, g * d, 0.0)
    else:
        out = kl_forward(raw, lo, hi, out_lo, out_hi, ESTIMATOR)
    tl.store(out_ptr + row * T + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


def _launch(logprobs, ref_logprobs, grad, out, params: KlPenaltyParams, backward: bool):
    rows, inner, lp_outer, lp_inner, T = row_layout(logprobs)
    if rows and T:
        _, _, ref_outer, ref_inner, _ = row_layout(ref_logprobs)
        block, col_blocks = split_blocks(T, 1024)
        kl_penalty_kernel[(rows * col_blocks,)](
            logprobs, ref_logprobs, grad, out, inner, lp_outer, lp_inner, ref_outer, ref_inner, T, col_blocks,
            *kl_bounds(params), ESTIMATOR=int(params.estimator), BACKWARD=backward, BLOCK_T=block)
    return out


def _rows(x: torch.Tensor) -> int:
    return x.size(0) if x.dim() == 2 else x.size(0) * x.size(1)


def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, params: KlPenaltyParams) -> torch.Tensor:
    """Same contract as the C++ kernel: (outer, inner, T) views in (here also (rows, T) tensors with a unit
    stride along T: ``row_layout``), the (rows, T) estimate out, fp32 (fp64)."""
    out = torch.empty(_rows(logprobs), logprobs.size(-1), dtype=accumulate_dtype(logprobs.dtype),
                      device=logprobs.device)
    return _launch(logprobs, ref_logprobs, out, out, params, False)


def kl_penalty_bwd(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   params: KlPenaltyParams) -> torch.Tensor:
    """Same contract as the C++ kernel: d loss / d r, (rows, T) in the inputs' dtype."""
    out = torch.empty(_rows(logprobs), logprobs.size(-1), dtype=logprobs.dtype, device=logprobs.device)
    return _launch(logprobs, ref_logprobs, grad, out, params, True)


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    aligned = ("lp_ptr", "ref_ptr", "out_ptr", "grad_ptr", "lp_stride_outer", "lp_stride_inner", "ref_stride_outer",
               "ref_stride_inner", "T")
    for dtype in ("bf16", "fp32"):
        for backward in (False, True):
            specs.append(AotSpec(
                "kl_penalty_kernel", {"lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "grad_ptr": "*fp32",
                                      "out_ptr": f"*{dtype}" if backward else "*fp32", "lo": "fp32", "hi": "fp32",
                                      "out_lo": "fp32", "out_hi": "fp32"},
                {"ESTIMATOR": 2, "BACKWARD": backward, "BLOCK_T": 1024}, aligned=aligned,
                label=f"{dtype}+k3{'+backward' if backward else ''}"))
    return specs


AOT_SPECS = _aot_specs()
