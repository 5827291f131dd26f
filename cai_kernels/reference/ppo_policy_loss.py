"""ppo_policy_loss in plain PyTorch: PPO's clipped surrogate, with dual clip (veRL conventions)."""

from __future__ import annotations

import torch

from .._params import LOG_RATIO_LIMIT
from .._validation import compute_dtype
from ._reductions import agg_loss, masked_mean


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: float | None = None, agg: str = "token-mean"):
    """PPO's clipped surrogate objective, as a loss to minimize (veRL ``compute_policy_loss``).

    Per response token, with log_ratio = clamp(logprobs - old_logprobs, -20, 20) (before exp: no
    inf, no NaN) and ratio = exp(log_ratio):
        loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    and with dual-clip PPO (Ye et al. 2020, ``dual_clip`` = c > 1), for A < 0:
        loss_t = min(loss_t, -A * c)
    aggregated by ``agg`` (see ``agg_loss``). Returns (loss, stats), stats 0-d tensors over response
    tokens: clipfrac (the clipped branch is taken), dual_clipfrac (the dual clip bound is taken),
    approx_kl = mean((ratio - 1) - log_ratio) (k3 of KL(old || new), CleanRL's approx_kl) and
    approx_kl_k1 = mean(-log_ratio) (veRL's ppo_kl).
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    # masked positions are never read: zeroed first, so that NaN / inf there cannot reach the gradient
    # through 0 * NaN (the where inside agg_loss alone would not keep it out)
    mask = response_mask != 0
    logprobs, old_logprobs, advantages = (torch.where(mask, x.to(dtype), 0.0)
                                          for x in (logprobs, old_logprobs, advantages))
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).to(dtype), response_mask)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        dual_clipfrac = masked_mean(dual.to(dtype), response_mask)
    else:
        dual_clipfrac = torch.zeros((), dtype=dtype, device=logprobs.device)
    stats = {
        "clipfrac": clipfrac,
        "dual_clipfrac": dual_clipfrac,
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
        "approx_kl_k1": masked_mean(-log_ratio, response_mask),
    }
    return agg_loss(loss, response_mask, agg), {k: v.detach() for k, v in stats.items()}
