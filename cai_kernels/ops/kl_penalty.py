"""kl_penalty: per-token KL estimates (k1 / k2 / k3 / abs) in fp32, stable, differentiable.

The compiled backends run as the custom op ``cai_kernels::kl_penalty`` (fake implementation and
autograd formula registered) while torch.compile traces; eager calls run the kernel directly
(``_kernel_op.py``). One kernel launch forward, one backward.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import ESTIMATORS, LOW_VAR_KL_CLAMP, LOW_VAR_KL_OUTPUT_CLAMP, KlPenaltyParams
from .._validation import accumulate_dtype, check_bounds, check_choice, check_float_tensor, check_same_device, \
    common_dtype
from ..reference.kl_penalty import kl_penalty as reference
from ._kernel_op import KernelOp
from ._layout import kernel_rows, rows_view, vmap_rows


def _vmap(in_dims, logprobs, ref_logprobs, *, params, backend):
    """Per-token: the vmapped dimension is one more leading dimension of the rows."""
    (logprobs, ref_logprobs), size = vmap_rows(in_dims, logprobs, ref_logprobs)
    # one (N, T) layout for both (an expanded, not vmapped input is copied: the kernel takes one row layout)
    T = logprobs.size(-1)
    out = _forward(rows_view(logprobs.reshape(-1, T)), rows_view(ref_logprobs.reshape(-1, T)), params=params,
                   backend=backend)
    return out.view(size, -1, T), 0


_forward = KernelOp("kl_penalty", op="kl_penalty", kernel="kl_penalty_fwd", args="Tensor logprobs, Tensor ref_logprobs",
                    params=KlPenaltyParams, returns="Tensor", vmap=_vmap)
_backward = KernelOp("kl_penalty_backward", op="kl_penalty", kernel="kl_penalty_bwd",
                     args="Tensor grad, Tensor logprobs, Tensor ref_logprobs", params=KlPenaltyParams, returns="Tensor")


def _rows(x: torch.Tensor):
    """Rows of an (outer, inner, T) view or of a (rows, T) tensor (what ``kernel_rows`` passes the Triton backend)."""
    return x.size(0) if x.dim() == 2 else x.size(0) * x.size(1)


@_forward.register_fake
def _(logprobs, ref_logprobs, params):
    return logprobs.new_empty(_rows(logprobs), logprobs.size(-1), dtype=accumulate_dtype(logprobs.dtype))


@_backward.register_fake
def _(grad, logprobs, ref_logprobs, params):
    return logprobs.new_empty(_rows(logprobs), logprobs.size(-1))


def _setup_context(ctx, args, params, backend, output):
    ctx.save_for_backward(*args)
    ctx.params, ctx.backend = params, backend


def _backward_formula(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    if grad is None:
        return None, None
    grad_log_ratio = _backward(grad.contiguous(), logprobs, ref_logprobs, params=ctx.params, backend=ctx.backend)
    if logprobs.dim() != 2:  # (rows, T) from the kernel; a (rows, T) input needs no view
        grad_log_ratio = grad_log_ratio.view(logprobs.shape)
    grad_ref = -grad_log_ratio if ctx.needs_input_grad[1] else None
    return grad_log_ratio, grad_ref


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *,
               clamp: tuple[float | None, float | None] | None = None,
               output_clamp: tuple[float | None, float | None] | None = None,
               backend: str | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, in fp32.

    With r = logprobs - ref_logprobs (formed in fp32, so bf16 inputs lose nothing more), clamped
    to ``clamp`` = (lo, hi) when given:
        "k1"  r                  "k2"  r^2 / 2
        "k3"  exp(-r) - 1 + r    "abs" |r|
        "low_var_kl"  k3 with veRL's clamps: clamp=(-20, 20), output_clamp=(-10, 10) by default
    k3 is computed without cancellation (a series for |r| <= 1, so it is >= 0 and exact to a few
    ulp for tiny r); it overflows to +inf only where r < -88.7 (the ratio exceeds fp32: pass clamp).
    The estimate is then clamped to ``output_clamp`` = (lo, hi) when given. Either bound of a
    pair may be None. Never NaN for finite inputs.

    Args:
        logprobs, ref_logprobs: same shape (..., T), fp32 / bf16 / fp16 / fp64 (may differ: the
            lower precision is upcast), any strides. Typically (B, T).
    Returns:
        The estimate, same shape, fp32 (fp64 for fp64 inputs). No masking: multiply or select
        with your response mask (``ppo_advantages`` does).
    Gradient: w.r.t. logprobs and ref_logprobs (d/d ref = -d/d logprobs), in their dtypes; a
    clamp passes the gradient where its input lies within the bounds (as torch.clamp).
    """
    check_float_tensor("logprobs", logprobs, min_ndim=1)
    check_float_tensor("ref_logprobs", ref_logprobs, min_ndim=1)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}; "
                         f"got {tuple(ref_logprobs.shape)}")
    check_same_device(("logprobs", "ref_logprobs"), logprobs, ref_logprobs)
    kind = check_choice("estimator", estimator, ESTIMATORS)
    lo, hi = check_bounds("clamp", clamp)
    out_lo, out_hi = check_bounds("output_clamp", output_clamp)
    chosen = _registry.select_backend("kl_penalty", logprobs.device, backend)
    if chosen == "reference" or logprobs.numel() == 0:  # nothing to compute: keep the autograd graph simple
        return reference(logprobs, ref_logprobs, estimator, clamp=clamp, output_clamp=output_clamp)
    if estimator == "low_var_kl":  # k3 (kind) with veRL's clamps unless others are given
        if clamp is None:
            lo, hi = LOW_VAR_KL_CLAMP
        if output_clamp is None:
            out_lo, out_hi = LOW_VAR_KL_OUTPUT_CLAMP
    if logprobs.dtype != ref_logprobs.dtype:
        dtype = common_dtype(logprobs, ref_logprobs)
        logprobs_, ref_ = logprobs.to(dtype), ref_logprobs.to(dtype)
    else:
        logprobs_, ref_ = logprobs, ref_logprobs
    lp_rows, ref_rows = kernel_rows(logprobs_, chosen), kernel_rows(ref_, chosen)
    if lp_rows.shape != ref_rows.shape:
        # differently strided inputs took different forms: a (rows, T) tensor as it is and a copied one as
        # (1, rows, T); a contiguous (B, K, T) collapsed to (1, B*K, T) and a permuted one kept as (B, K, T).
        # The kernels index both with one row layout, and both gradients take one shape: one form for both
        lp_rows, ref_rows = rows_view(logprobs_), rows_view(ref_)
        if lp_rows.shape != ref_rows.shape:
            lp_rows, ref_rows = rows_view(logprobs_.contiguous()), rows_view(ref_.contiguous())
    out = _forward(lp_rows, ref_rows, params=KlPenaltyParams(kind, lo, hi, out_lo, out_hi), backend=chosen)
    return out if logprobs.dim() == 2 else out.view(logprobs.shape)
