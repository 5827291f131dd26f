"""reward_pairwise_loss in plain PyTorch: last_token_rewards of both sides, then pairwise_loss."""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype
from .last_token_rewards import last_token_rewards
from .pairwise_loss import pairwise_loss


def reward_pairwise_loss(chosen_hidden: torch.Tensor, chosen_mask: torch.Tensor, rejected_hidden: torch.Tensor,
                         rejected_mask: torch.Tensor, head_weight: torch.Tensor,
                         head_bias: torch.Tensor | None = None, *, soft_labels=None, margin=None):
    """One PM step from hidden states: rewards at each sequence's last real token, then the mean
    ``pairwise_loss``. Returns (loss, chosen_rewards (B,), rejected_rewards (B,))."""
    # the head in fp32 once: its gradient from both sides is summed in fp32 and rounded once to its dtype
    acc = accumulate_dtype(chosen_hidden.dtype)
    head_weight, head_bias = head_weight.to(acc), None if head_bias is None else head_bias.to(acc)
    chosen_rewards = last_token_rewards(chosen_hidden, chosen_mask, head_weight, head_bias)
    rejected_rewards = last_token_rewards(rejected_hidden, rejected_mask, head_weight, head_bias)
    loss = pairwise_loss(chosen_rewards, rejected_rewards, soft_labels=soft_labels, margin=margin)
    return loss, chosen_rewards, rejected_rewards
