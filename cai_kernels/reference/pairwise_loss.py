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
    acc = accumulate_dtype(chosen_rewards.dtype)
    d = chosen_rewards.to(acc) - rejected_rewards.to(acc)
    if margin is not None:
        d = d - (margin.detach().to(acc) if isinstance(margin, torch.Tensor) else margin)
    p = 1.0 if soft_labels is None else soft_labels
    if isinstance(p, torch.Tensor):
        p = p.detach().to(acc)
    loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    return reduce_loss(loss, reduction)
