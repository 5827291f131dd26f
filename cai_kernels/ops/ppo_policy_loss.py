"""ppo_policy_loss: PPO's clipped surrogate loss over response tokens, fused (veRL conventions).

The compiled backends run as the custom ops ``cai_kernels::ppo_policy_loss`` / ``_backward``
(``_clipped_loss.py``: fake implementations and an autograd formula registered), so torch.compile traces
training steps that call it without a graph break.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import AGG_MODES, PpoPolicyLossParams
from .._validation import check_choice, check_loss_inputs, check_number
from ..reference.ppo_policy_loss import ppo_policy_loss as reference
from ._clipped_loss import clipped_loss_op, loss_stats
from ._layout import as_rows, detached, kernel_mask

POLICY_STATS = ("clipfrac", "dual_clipfrac", "approx_kl", "approx_kl_k1")
_forward = clipped_loss_op("ppo_policy_loss", PpoPolicyLossParams, ("logprobs", "old_logprobs", "advantages"),
                           n_stats=1 + len(POLICY_STATS))


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: float | None = None, agg: str = "token-mean", backend: str | None = None):
    """PPO's clipped surrogate loss over response tokens, with optional dual clip (veRL conventions).

    Per response token, log_ratio = clamp(logprobs - old_logprobs, -20, 20) (clamped *before* exp:
    no inf, no NaN, whatever the inputs), ratio = exp(log_ratio):
        loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (dual_clip = c > 1), where A < 0:  loss_t = min(loss_t, -A * c)
    reduced by ``agg`` over response tokens:
        "token-mean"           sum / number of response tokens
        "seq-mean-token-mean"  mean over rows (that have response tokens) of each row's token mean
        "seq-mean-token-sum"   mean over rows (that have response tokens) of each row's token sum
    No response token at all: loss 0 and stats 0 (never NaN).

    Args:
        logprobs: (B, T) current policy log-probs, fp32 / bf16 / fp16 / fp64, any strides.
        old_logprobs, advantages: (B, T), the rollout's log-probs and (whitened) advantages.
        response_mask: (B, T), nonzero = response token.
        clip_low in [0, 1), clip_high >= 0 (asymmetric "clip-higher" allowed); dual_clip None or > 1.
    Returns:
        (loss, stats): loss a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable w.r.t.
        logprobs only (old_logprobs and advantages are constants); stats a dict of detached 0-d
        tensors, means over response tokens: "clipfrac" (the clipped term is the larger),
        "dual_clipfrac" (the dual-clip bound is taken; 0 without dual_clip), "approx_kl"
        (mean of (ratio - 1) - log_ratio, k3 of KL(old || new), as CleanRL) and "approx_kl_k1"
        (mean of -log_ratio, veRL's ppo_kl).
    """
    check_loss_inputs(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), response_mask)
    clip_low = check_number("clip_low", clip_low, low=0.0, high=1.0)
    if clip_low == 1.0:
        raise ValueError("clip_low must be a finite number in [0, 1); got 1.0")
    clip_high = check_number("clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = check_number("dual_clip", dual_clip, low=1.0, low_open=True)
    agg_mode = check_choice("agg", agg, AGG_MODES)
    chosen = _registry.select_backend("ppo_policy_loss", logprobs.device, backend)
    old_logprobs, advantages = detached(old_logprobs), detached(advantages)
    if chosen == "reference":
        return reference(logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high,
                         dual_clip=dual_clip, agg=agg)
    inputs = (*as_rows(logprobs, old_logprobs, advantages), kernel_mask(response_mask))
    params = PpoPolicyLossParams(clip_low, clip_high, dual_clip, agg_mode)
    loss, stats = loss_stats(_forward, inputs, params, chosen)
    return loss, dict(zip(POLICY_STATS, stats.unbind()))
