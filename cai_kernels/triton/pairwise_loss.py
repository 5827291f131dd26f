"""Triton kernels of pairwise_loss: the soft-label Bradley–Terry loss of a preference model, one pass each way.

The launchers have the same contracts as the C++ kernels (``csrc/cpu/pairwise_loss.cpp``); the math is
in its header comment and in ``cai_kernels/reference/pairwise_loss.py``. With e = exp(-|d|):
    pair loss = log1p(e^-|d|) + d * (d > 0 ? 1 - p : -p),   dloss/dd = (1 - p) sigmoid(d) - p sigmoid(-d)
computed from h = d / 2 = chosen / 2 - rejected / 2 - margin / 2, which never overflows for finite rewards
(d * coef = 2 (h * coef)); a term whose weight is 0 contributes 0, also at d = +-inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import PairwiseLossParams, Reduction
from .._validation import accumulate_dtype
from ._launch import cdiv
from ._logistic import log1p, sigmoid
from ._reduce import sum_partials

PAIR_BLOCK = 1024


@triton.jit
def _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value, margin_value,
                 acc_dtype: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """h = d / 2 = chosen / 2 - rejected / 2 - margin / 2 and p for a block of rows, in the accumulation dtype."""
    chosen = tl.load(chosen_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
    rejected = tl.load(rejected_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
    h = chosen * 0.5 - rejected * 0.5
    if HAS_MARGIN:
        h -= tl.load(margin_ptr + rows, mask=in_range, other=0.0) * 0.5
    else:
        h -= margin_value * 0.5
    if HAS_LABELS:
        p = tl.load(labels_ptr + rows, mask=in_range, other=1.0)
        # a label outside [0, 1] (or NaN) is bad data, checked here on the device: NaN for that pair
        p = tl.where((p >= 0.0) & (p <= 1.0), p, float("nan"))
    else:
        p = tl.zeros(h.shape, acc_dtype) + label_value
    return h, p


@triton.jit
def pairwise_loss_fwd_kernel(
    chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, loss_ptr, block_sums_ptr,
    N, label_value, margin_value,
    HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, REDUCE: tl.constexpr, ONE_PROGRAM: tl.constexpr,
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-pair losses into loss_ptr; or (REDUCE) their sum: one float64 partial sum per program into
    block_sums_ptr (finished by sum_partials_kernel), or with ONE_PROGRAM the sum (MEAN: / N) into loss_ptr[0]
    directly (one launch in all)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    acc_dtype = loss_ptr.dtype.element_ty
    h, p = _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value,
                        margin_value, acc_dtype, HAS_LABELS, HAS_MARGIN)
    coef = tl.where(h > 0, 1.0 - p, -p)
    bounded = log1p(tl.exp(-2.0 * tl.abs(h)))
    half_linear = tl.where(coef == 0, 0.0, h * coef)
    if REDUCE:  # summed in float64: each linear part may be up to FLT_MAX, their mean still finite
        loss64 = bounded.to(tl.float64) + 2.0 * half_linear.to(tl.float64)
        total = tl.sum(tl.where(in_range, loss64, 0.0), axis=0)
        if ONE_PROGRAM:
            if MEAN:
                total = total / N
            tl.store(loss_ptr, total.to(acc_dtype))
        else:
            tl.store(block_sums_ptr + tl.program_id(0), total)
    else:
        tl.store(loss_ptr + rows, bounded + 2.0 * half_linear, mask=in_range)


@triton.jit
def pairwise_loss_bwd_kernel(
    grad_ptr, chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, grad_chosen_ptr, grad_rejected_ptr,
    N, label_value, margin_value, grad_scale,
    HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, GRAD_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """dloss/dchosen = g (sigmoid(d) - p) = -dloss/drejected; g per row, or grad_ptr[0] * grad_scale (1 / N for
    a mean) read on the device, so a reduced loss needs no host sync."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    acc_dtype = grad_ptr.dtype.element_ty
    h, p = _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value,
                        margin_value, acc_dtype, HAS_LABELS, HAS_MARGIN)
    d = 2.0 * h  # inf where the rewards' difference is beyond the range: sigmoid is exact there
    if GRAD_PER_ROW:
        g = tl.load(grad_ptr + rows, mask=in_range, other=0.0)
    else:
        g = tl.load(grad_ptr) * grad_scale
    sig = sigmoid(d)
    sig_neg = sigmoid(-d)
    grad = ((1.0 - p) * sig - p * sig_neg) * g  # NaN where the label is bad (see _pair_inputs)
    tl.store(grad_chosen_ptr + rows, grad.to(grad_chosen_ptr.dtype.element_ty), mask=in_range)
    tl.store(grad_rejected_ptr + rows, (-grad).to(grad_rejected_ptr.dtype.element_ty), mask=in_range)


def _per_row_if_fp64(values: torch.Tensor, value: float, like: torch.Tensor) -> torch.Tensor:
    """Triton passes Python floats as fp32 scalars: in fp64, a scalar label / margin becomes a per-row tensor."""
    if values.numel() or like.dtype != torch.float64:
        return values
    return torch.full((like.numel(),), value, dtype=torch.float64, device=like.device)


def pairwise_loss_fwd(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor,
                      params: PairwiseLossParams) -> torch.Tensor:
    """Same contract as the C++ kernel (csrc/cpu/pairwise_loss.cpp): chosen, rejected (N,) contiguous; labels,
    margin (N,) in the accumulation dtype or empty (then params.label_value / margin_value for every pair),
    labels in [0, 1]: checked on the device, NaN for a pair whose label is not (the C++ kernel raises
    ValueError; the ops layer checks CPU tensors). Returns the (N,) losses, or their sum / mean as a 0-d
    tensor: one launch (two for more than PAIR_BLOCK pairs reduced: the partial sums are added in order)."""
    n = chosen.numel()
    label_value, margin_value, reduction = params.label_value, params.margin_value, params.reduction
    acc = accumulate_dtype(chosen.dtype)
    labels, margin = _per_row_if_fp64(labels, label_value, chosen), _per_row_if_fp64(margin, margin_value, chosen)
    programs = -(-n // PAIR_BLOCK)
    reduce, mean = reduction != Reduction.NONE, reduction == Reduction.MEAN
    if not reduce:
        loss = torch.empty(n, dtype=acc, device=chosen.device)
        block_sums = loss
    else:
        loss = torch.empty((), dtype=acc, device=chosen.device)
        block_sums = loss if programs <= 1 else torch.empty(programs, dtype=torch.float64, device=chosen.device)
    if n:
        pairwise_loss_fwd_kernel[(programs,)](
            chosen, rejected, labels if labels.numel() else chosen, margin if margin.numel() else chosen,
            loss, block_sums, n, label_value, margin_value,
            HAS_LABELS=labels.numel() > 0, HAS_MARGIN=margin.numel() > 0,
            REDUCE=reduce, ONE_PROGRAM=programs <= 1, MEAN=mean, BLOCK=PAIR_BLOCK, num_warps=4)
        if reduce and programs > 1:
            sum_partials(block_sums, loss, n if mean else 1)
    elif reduce:
        loss.zero_()  # the sum of no pairs (a mean needs a pair: the ops layer refuses an empty batch)
    return loss


def pairwise_loss_bwd(grad: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor,
                      margin: torch.Tensor, params: PairwiseLossParams):
    """Same contract as the C++ kernel: the gradients w.r.t. chosen and rejected, in their dtype."""
    n = chosen.numel()
    label_value, margin_value, reduction = params.label_value, params.margin_value, params.reduction
    labels, margin = _per_row_if_fp64(labels, label_value, chosen), _per_row_if_fp64(margin, margin_value, chosen)
    grad_chosen, grad_rejected = torch.empty_like(chosen), torch.empty_like(rejected)
    if n:
        per_row = reduction == Reduction.NONE
        pairwise_loss_bwd_kernel[(cdiv(n, PAIR_BLOCK),)](
            grad, chosen, rejected, labels if labels.numel() else chosen, margin if margin.numel() else chosen,
            grad_chosen, grad_rejected, n, label_value, margin_value,
            1.0 / n if reduction == Reduction.MEAN else 1.0,
            HAS_LABELS=labels.numel() > 0, HAS_MARGIN=margin.numel() > 0, GRAD_PER_ROW=per_row,
            BLOCK=PAIR_BLOCK, num_warps=4)
    return grad_chosen, grad_rejected


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    pair_common = {"label_value": "fp32", "margin_value": "fp32"}
    for dtype in ("fp32", "bf16"):
        inputs = {"chosen_ptr": f"*{dtype}", "rejected_ptr": f"*{dtype}", "labels_ptr": "*fp32", "margin_ptr": "*fp32"}
        for reduce in (False, True):
            specs.append(AotSpec(
                "pairwise_loss_fwd_kernel",
                inputs | {"loss_ptr": "*fp32", "block_sums_ptr": "*fp64"} | pair_common,
                {"HAS_LABELS": True, "HAS_MARGIN": True, "REDUCE": reduce, "ONE_PROGRAM": False, "MEAN": reduce,
                 "BLOCK": PAIR_BLOCK},
                aligned=("chosen_ptr", "rejected_ptr", "labels_ptr", "margin_ptr", "loss_ptr", "block_sums_ptr", "N"),
                label=f"{dtype}{'+sum' if reduce else ''}"))
        for per_row in (False, True):
            specs.append(AotSpec(
                "pairwise_loss_bwd_kernel",
                {"grad_ptr": "*fp32"} | inputs | {"grad_chosen_ptr": f"*{dtype}", "grad_rejected_ptr": f"*{dtype}"}
                | pair_common | {"grad_scale": "fp32"},
                {"HAS_LABELS": True, "HAS_MARGIN": False, "GRAD_PER_ROW": per_row, "BLOCK": PAIR_BLOCK},
                aligned=("grad_ptr", "chosen_ptr", "rejected_ptr", "labels_ptr", "margin_ptr", "grad_chosen_ptr",
                         "grad_rejected_ptr", "N"),
                label=f"{dtype}{'+per-row' if per_row else ''}"))
    return specs


AOT_SPECS = _aot_specs()
