"""reward_ranked_loss in plain PyTorch: last_token_rewards of K responses, then ranked_pairwise_loss."""

from __future__ import annotations

import torch

from .last_token_rewards import apply_head, last_token_hidden
from .ranked_pairwise_loss import ranked_pairwise_loss


def reward_ranked_loss(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None, *, num_valid: torch.Tensor | None = None):
    """Ranked PM step from hidden states (B, K, T, H) and masks (B, K, T): rewards (B, K) at each response's
    last real token (0 for responses k >= n_b, which may be all padding), then the mean
    ``ranked_pairwise_loss``. Returns (loss, rewards)."""
    last_hidden = last_token_hidden(hidden, mask)
    if num_valid is None:
        return _ranked(apply_head(last_hidden, head_weight, head_bias), None)
    valid = torch.arange(hidden.size(1), device=hidden.device) < num_valid[:, None]
    # padding responses are never read: zeroed before the head, so that NaN there cannot reach the head's
    # gradient through 0 * NaN
    rewards = apply_head(torch.where(valid[..., None], last_hidden, 0.0), head_weight, head_bias)
    return _ranked(rewards.masked_fill(~valid, 0.0), num_valid)


def _ranked(rewards: torch.Tensor, num_valid: torch.Tensor | None):
    return ranked_pairwise_loss(rewards, num_valid=num_valid), rewards
