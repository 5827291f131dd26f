"""Triton kernels of ppo_policy_loss: PPO's clipped surrogate per token (``policy_token``) in the shared row
loops of ``_clipped_loss.py``. Same contracts as csrc/cpu/ppo_policy_loss.cpp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import LOG_RATIO_LIMIT, PpoPolicyLossParams
from ._clipped_loss import clipped_loss_aot_specs, clipped_loss_bwd, clipped_loss_fwd, max_grad
from ._clipped_loss import (  # noqa: F401 - named by AOT_SPECS
    clipped_loss_bwd_kernel, clipped_loss_finish_kernel, clipped_loss_fwd_kernel)
from ._kl_math import exp_minus_1_minus_x

LIMIT = tl.constexpr(LOG_RATIO_LIMIT)
NAN = tl.constexpr(tl.PropagateNan.ALL)
STATS = 4  # clipfrac, dual_clipfrac, approx_kl (k3), approx_kl_k1


@triton.jit
def policy_token(logprobs, old_logprobs, advantages, ratio_low, ratio_high, dual_clip, HAS_DUAL: tl.constexpr):
    """Per token: the loss max(-A r, -A clamp(r, ratio_low, ratio_high)) (then min(., -A dual_clip) where A < 0
    with HAS_DUAL), r = exp(log_ratio), log_ratio = logprobs - old_logprobs clamped to +-LIMIT; whether the
    clipped term is the larger, whether the dual bound is taken, k3 and k1 of KL(old || new), d loss / d logprobs."""
    raw = logprobs - old_logprobs
    # NaN propagates through every clamp and max, as in torch (Triton's default would drop it)
    log_ratio = tl.minimum(tl.maximum(raw, -LIMIT, propagate_nan=NAN), LIMIT, propagate_nan=NAN)
    ratio = tl.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * tl.minimum(tl.maximum(ratio, ratio_low, propagate_nan=NAN), ratio_high, propagate_nan=NAN)
    loss = tl.maximum(unclipped, clipped, propagate_nan=NAN)
    grad = max_grad(unclipped, clipped, unclipped,
                    tl.where((ratio >= ratio_low) & (ratio <= ratio_high), unclipped, 0.0))
    zero = tl.zeros_like(loss)
    dual_hit = zero != 0
    if HAS_DUAL:
        bound = -advantages * dual_clip
        negative = advantages < 0
        dual_hit = negative & (loss > bound)
        # min(loss, bound) as torch.minimum (a NaN loss keeps its gradient)
        grad = tl.where(negative, tl.where(loss > bound, 0.0, tl.where(loss == bound, 0.5 * grad, grad)), grad)
        loss = tl.where(negative, tl.minimum(loss, bound, propagate_nan=NAN), loss)
    grad = tl.where((raw >= -LIMIT) & (raw <= LIMIT), grad, 0.0)
    return (loss, tl.where(clipped > unclipped, zero + 1.0, zero), tl.where(dual_hit, zero + 1.0, zero),
            exp_minus_1_minus_x(log_ratio), -log_ratio, grad)


def _token_args(params: PpoPolicyLossParams) -> dict:
    has_dual = params.dual_clip is not None
    return dict(token=policy_token, option=has_dual,
                scalars=(1.0 - params.clip_low, 1.0 + params.clip_high, params.dual_clip if has_dual else 0.0))


def ppo_policy_loss_fwd(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, params: PpoPolicyLossParams):
    """Same contract as the C++ kernel: (loss, stats [clipfrac, dual_clipfrac, approx_kl, approx_kl_k1],
    row weights)."""
    return clipped_loss_fwd(logprobs, old_logprobs, advantages, mask, agg=params.agg, n_stats=1 + STATS,
                            **_token_args(params))


def ppo_policy_loss_bwd(grad_loss: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor, row_weights: torch.Tensor,
                        params: PpoPolicyLossParams) -> torch.Tensor:
    """Same contract as the C++ kernel: d loss / d logprobs in logprobs' dtype."""
    return clipped_loss_bwd(grad_loss, logprobs, old_logprobs, advantages, mask, row_weights, **_token_args(params))


AOT_SPECS = clipped_loss_aot_specs(policy_token, "dual")
