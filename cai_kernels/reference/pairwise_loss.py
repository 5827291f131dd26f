"""pairwise_loss in plain PyTorch (conventions of the preference-model ops: ``cai_kernels/reference/__init__.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import accumulate_dtype
from ._reductions import reduce_loss


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                  soft_labels: torch.Tensor | float | None = None, margin: torch.Tensor | float | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Bradley–Terry loss with soft labels, per pair:

        d    = chosen - rejected - margin
        loss = -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d))

    the cross-entropy between the label p and the model's P(chosen > rejected) = sigmoid(d); with
    p = 1 it is TRL's / OpenRLHF's ``-logsigmoid(chosen - rejected - margin)``.

    Args:
        chosen_rewards, rejected_rewards: (...) same shape, fp32 / bf16 / fp16 / fp64.
        soft_labels: P(chosen preferred), a float or a tensor broadcastable to the rewards' shape,
            values in [0, 1]; None means 1.
        margin: a float or a tensor broadcastable to the rewards' shape; None means 0.
        reduction: "mean" | "sum" | "none".
    Returns:
        fp32 (fp64 for fp64 rewards): a scalar, or (...) with reduction="none".
    """
    # float64 whatever the input dtype (rounded once at the end): chosen - rejected of two finite fp32
    # rewards (3e38 and -3e38) overflows fp32, never float64
    d = chosen_rewards.to(torch.float64) - rejected_rewards.to(torch.float64)
    if margin is not None:
        d = d - (margin.detach().to(torch.float64) if isinstance(margin, torch.Tensor) else margin)
    p = torch.as_tensor(1.0 if soft_labels is None else soft_labels, dtype=torch.float64, device=d.device).detach()
    # a term whose weight is 0 contributes 0, also where its logsigmoid is -inf (d = +-inf): the
    # cross-entropy convention 0 log 0 = 0; with p = 1 the loss is exactly -logsigmoid(d)
    loss = -(torch.where(p != 0, p * F.logsigmoid(d), 0.0) + torch.where(p != 1, (1 - p) * F.logsigmoid(-d), 0.0))
    return reduce_loss(loss, reduction).to(accumulate_dtype(chosen_rewards.dtype))
