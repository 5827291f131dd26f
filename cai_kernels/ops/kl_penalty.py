"""kl_penalty: per-token KL estimates (k1 / k2 / k3 / abs) in fp32, stable, differentiable.

The compiled backends run as the custom op ``cai_kernels::kl_penalty`` (fake implementation and
autograd formula registered), so torch.compile traces callers without a graph break.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._extension import cpu_kernels
from .._validation import check_float_tensor
from ..reference import ppo as reference
from ._layout import rows_view
from ._ppo_args import (accumulate_dtype, call_kernel_directly, check_bounds, check_choice, check_same_device,
                        common_dtype)

ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}


def _kernels(backend: str):
    if backend == "cpu":
        return cpu_kernels
    from ..triton import ppo
    return ppo


@torch.library.custom_op("cai_kernels::kl_penalty", mutates_args=())
def _kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int, lo: float, hi: float,
                out_lo: float, out_hi: float, backend: str) -> torch.Tensor:
    return _kernels(backend).kl_penalty_fwd(logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi)


@_kl_penalty.register_fake
def _(logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi, backend):
    return logprobs.new_empty(logprobs.size(0) * logprobs.size(1), logprobs.size(2),
                              dtype=accumulate_dtype(logprobs.dtype))


@torch.library.custom_op("cai_kernels::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: int,
                         lo: float, hi: float, out_lo: float, out_hi: float, backend: str) -> torch.Tensor:
    return _kernels(backend).kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi)


@_kl_penalty_backward.register_fake
def _(grad, logprobs, ref_logprobs, estimator, lo, hi, out_lo, out_hi, backend):
    return logprobs.new_empty(logprobs.size(0) * logprobs.size(1), logprobs.size(2))


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, *constants = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.constants = constants


def _backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    grad_log_ratio = _kl_penalty_backward(grad.contiguous(), logprobs, ref_logprobs, *ctx.constants)
    grad_log_ratio = grad_log_ratio.view(logprobs.shape)
    grad_ref = -grad_log_ratio if ctx.needs_input_grad[1] else None
    return grad_log_ratio, grad_ref, None, None, None, None, None, None


_kl_penalty.register_autograd(_backward, setup_context=_setup_context)


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
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_choice("estimator", estimator, reference.ESTIMATORS)
    lo, hi = check_bounds("clamp", clamp)
    out_lo, out_hi = check_bounds("output_clamp", output_clamp)
    chosen = _registry.select_backend("kl_penalty", logprobs.device, backend)
    if chosen == "reference" or logprobs.numel() == 0:  # nothing to compute: keep the autograd graph simple
        return reference.kl_penalty(logprobs, ref_logprobs, estimator, clamp=clamp, output_clamp=output_clamp)
    if estimator == "low_var_kl":
        estimator = "k3"
        if clamp is None:
            lo, hi = reference.LOW_VAR_KL_CLAMP
        if output_clamp is None:
            out_lo, out_hi = reference.LOW_VAR_KL_OUTPUT_CLAMP
    dtype = common_dtype(logprobs, ref_logprobs)
    args = (rows_view(logprobs if logprobs.dtype == dtype else logprobs.to(dtype)),
            rows_view(ref_logprobs if ref_logprobs.dtype == dtype else ref_logprobs.to(dtype)),
            ESTIMATOR_CODES[estimator], lo, hi, out_lo, out_hi)
    if call_kernel_directly(logprobs, ref_logprobs):
        out = _kernels(chosen).kl_penalty_fwd(*args)
    else:
        out = _kl_penalty(*args, chosen)
    return out.view(logprobs.shape)
