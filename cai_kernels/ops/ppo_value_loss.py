"""ppo_value_loss: PPO's clipped value loss over response tokens, fused (TRL / veRL ``compute_value_loss``).

The compiled backends run as the custom ops ``cai_kernels::ppo_value_loss`` / ``_backward``
(``_clipped_loss.py``: fake implementations and an autograd formula registered).
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import AGG_MODES, PpoValueLossParams
from .._validation import check_choice, check_loss_inputs, check_number
from ..reference.ppo_value_loss import ppo_value_loss as reference
from ._clipped_loss import clipped_loss_op, loss_stats
from ._layout import as_rows, detached, kernel_mask

_forward = clipped_loss_op("ppo_value_loss", PpoValueLossParams, ("values", "old_values", "returns"), n_stats=2)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   response_mask: torch.Tensor, *, clip: float | None = 0.2, agg: str = "token-mean",
                   backend: str | None = None):
    """PPO's clipped value loss over response tokens (TRL / veRL ``compute_value_loss``).

    Per response token, values_clipped = clamp(values, old_values - clip, old_values + clip):
        loss_t = 0.5 * max((values - returns)^2, (values_clipped - returns)^2)
    (``clip=None``: 0.5 * (values - returns)^2), reduced by ``agg`` as in ``ppo_policy_loss``.

    Args:
        values: (B, T) the value head's current predictions, fp32 / bf16 / fp16 / fp64, any strides.
        old_values, returns: (B, T), the rollout's values and the GAE returns.
        response_mask: (B, T), nonzero = response token. clip: None or >= 0.
    Returns:
        (loss, clipfrac): 0-d fp32 tensors (fp64 for fp64 inputs); loss differentiable w.r.t.
        values only; clipfrac (detached) the fraction of response tokens where the clipped term is
        the larger. No response token: both 0.
    """
    check_loss_inputs(("values", "old_values", "returns"), (values, old_values, returns), response_mask)
    if clip is not None:
        clip = check_number("clip", clip, low=0.0)
    agg_mode = check_choice("agg", agg, AGG_MODES)
    chosen = _registry.select_backend("ppo_value_loss", values.device, backend)
    old_values, returns = detached(old_values), detached(returns)
    if chosen == "reference":
        return reference(values, old_values, returns, response_mask, clip=clip, agg=agg)
    inputs = (*as_rows(values, old_values, returns), kernel_mask(response_mask))
    loss, stats = loss_stats(_forward, inputs, PpoValueLossParams(clip, agg_mode), chosen)
    return loss, stats.view(())
