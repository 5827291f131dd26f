"""Triton kernels of ppo_value_loss: PPO's clipped value loss per token (``value_token``) in the shared row
loops of ``_clipped_loss.py``. Same contracts as csrc/cpu/ppo_value_loss.cpp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import PpoValueLossParams
from ._clipped_loss import clipped_loss_aot_specs, clipped_loss_bwd, clipped_loss_fwd, max_grad
from ._clipped_loss import (  # noqa: F401 - named by AOT_SPECS
    clipped_loss_bwd_kernel, clipped_loss_finish_kernel, clipped_loss_fwd_kernel)

NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def value_token(values, old_values, returns, clip, unused_arg1, unused_arg2, HAS_CLIP: tl.constexpr):
    """Per token: the loss 0.5 max((v - R)^2, (clamp(v, old - clip, old + clip) - R)^2) (0.5 (v - R)^2 without
    HAS_CLIP), whether the clipped term is the larger (then three zero statistics), d loss / d values. The row
    loops pass three scalars; this formula reads the first."""
    err = values - returns
    unclipped = err * err
    zero = tl.zeros_like(unclipped)
    if HAS_CLIP:
        lo = old_values - clip
        hi = old_values + clip
        # NaN propagates through the clamp and the max, as in torch (Triton's default would drop it)
        clipped_err = tl.minimum(tl.maximum(values, lo, propagate_nan=NAN), hi, propagate_nan=NAN) - returns
        clipped = clipped_err * clipped_err
        loss = 0.5 * tl.maximum(unclipped, clipped, propagate_nan=NAN)
        is_clipped = clipped > unclipped
        grad = max_grad(unclipped, clipped, err, tl.where((values >= lo) & (values <= hi), clipped_err, 0.0))
    else:
        loss = 0.5 * unclipped
        is_clipped = zero != 0
        grad = err
    return loss, tl.where(is_clipped, zero + 1.0, zero), zero, zero, zero, grad


def _token_args(params: PpoValueLossParams) -> dict:
    has_clip = params.clip is not None
    return dict(token=value_token, option=has_clip, scalars=(params.clip if has_clip else 0.0, 0.0, 0.0))


def ppo_value_loss_fwd(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       params: PpoValueLossParams):
    """Same contract as the C++ kernel: (loss, stats [clipfrac], row weights)."""
    return clipped_loss_fwd(values, old_values, returns, mask, agg=params.agg, n_stats=2, **_token_args(params))


def ppo_value_loss_bwd(grad_loss: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
                       returns: torch.Tensor, mask: torch.Tensor, row_weights: torch.Tensor,
                       params: PpoValueLossParams) -> torch.Tensor:
    """Same contract as the C++ kernel: d loss / d values in values' dtype."""
    return clipped_loss_bwd(grad_loss, values, old_values, returns, mask, row_weights, **_token_args(params))


AOT_SPECS = clipped_loss_aot_specs(value_token, "clip")
