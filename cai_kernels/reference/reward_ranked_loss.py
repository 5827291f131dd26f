"""reward_ranked_loss in plain PyTorch: last_token_rewards of K responses, then ranked_pairwise_loss."""

from __future__ import annotations

import torch

from .last_token_rewards import last_token_rewards
from .ranked_pairwise_loss import ranked_pairwise_loss


def reward_ranked_loss(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None, *, num_valid: torch.Tensor | None = None):
    """Ranked PM step from hidden states (B, K, T, H) and masks (B, K, T): rewards (B, K) at each response's
    last real token (0 for responses k >= n_b, which may be all padding), then the mean
    ``ranked_pairwise_loss``. Returns (loss, rewards)."""
    rewards = last_token_rewards(hidden, mask, head_weight, head_bias)
    if num_valid is not None:
        valid = torch.arange(rewards.size(1), device=rewards.device) < num_valid[:, None]
        rewards = rewards.masked_fill(~valid, 0.0)
    return ranked_pairwise_loss(rewards, num_valid=num_valid), rewards
