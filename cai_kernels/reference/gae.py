"""gae in plain PyTorch: the reverse loop over time steps that PPO stacks write."""

from __future__ import annotations

import torch

from .._validation import compute_dtype


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: the reverse loop over time steps that PPO stacks write.

    On response tokens, walking t from T-1 down to 0:
        delta_t   = rewards_t + gamma * next_value - values_t
        running_t = delta_t + gamma * lam * running_{t+1}
    where next_value is the value of the next *response* token (0 after the last one). Masked
    positions are skipped: next_value and the running advantage are carried through them unchanged
    (veRL's skip-and-carry, for multi-turn masks with holes); for right-padded responses whose padded
    rewards and values are 0 this is exactly the usual loop. Rewards and values at masked positions
    are never read.

    Returns (advantages, returns), (B, T) fp32 (fp64 for fp64 inputs):
        advantages = running_t on response tokens, 0 on masked positions;
        returns    = advantages + values on response tokens, 0 on masked positions.
    """
    dtype = compute_dtype(rewards, values)
    rewards, values = rewards.to(dtype), values.to(dtype)
    mask = response_mask != 0
    batch, steps = rewards.shape
    next_value = rewards.new_zeros(batch)
    running = rewards.new_zeros(batch)
    advantages = rewards.new_zeros(batch, steps)
    for t in reversed(range(steps)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, running, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
