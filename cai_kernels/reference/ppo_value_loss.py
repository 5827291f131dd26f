"""ppo_value_loss in plain PyTorch: PPO's clipped value loss (TRL / veRL ``compute_value_loss``)."""

from __future__ import annotations

import torch

from .._validation import compute_dtype
from ._reductions import agg_loss, masked_mean


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   response_mask: torch.Tensor, *, clip: float | None = 0.2, agg: str = "token-mean"):
    """PPO's clipped value loss (TRL / veRL ``compute_value_loss``).

    Per response token, with values_clipped = clamp(values, old_values - clip, old_values + clip):
        loss_t = 0.5 * max((values - returns)^2, (values_clipped - returns)^2)
    (``clip=None``: 0.5 * (values - returns)^2), aggregated by ``agg``. Returns (loss, clipfrac),
    clipfrac the fraction of response tokens where the clipped term is the larger.
    """
    dtype = compute_dtype(values, old_values, returns)
    # masked positions are never read: zeroed first, so that NaN / inf there cannot reach the gradient
    # through 0 * NaN (the where inside agg_loss alone would not keep it out)
    mask = response_mask != 0
    values, old_values, returns = (torch.where(mask, x.to(dtype), 0.0) for x in (values, old_values, returns))
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * agg_loss(unclipped, response_mask, agg), torch.zeros((), dtype=dtype, device=values.device)
    values_clipped = torch.clamp(values, old_values - clip, old_values + clip)
    clipped = (values_clipped - returns).square()
    loss = 0.5 * agg_loss(torch.maximum(unclipped, clipped), response_mask, agg)
    return loss, masked_mean((clipped > unclipped).to(dtype), response_mask).detach()
