"""last_token_rewards in plain PyTorch: the scalar head at each sequence's last real token."""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(..., T) mask (nonzero = real token) -> (...) int64: the highest real position, -1 if none."""
    positions = torch.arange(mask.size(-1), device=mask.device)
    return torch.where(mask != 0, positions, -1).amax(-1)


def last_token_rewards(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head applied to each sequence's last real token.

    Args:
        hidden: (..., T, H) fp32 / bf16 / fp16 / fp64, any strides.
        mask: (..., T) bool or integer, nonzero = real token; every sequence needs one (a sequence with
            none gets the head applied to position 0: the public ops reject it before).
        head_weight: (H,) or (1, H); head_bias: 0-d / 1-element tensor or None.
    Returns:
        (...) rewards, fp32 (fp64 for fp64 hidden).
    """
    return apply_head(last_token_hidden(hidden, mask), head_weight, head_bias)


def last_token_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., T, H) hidden, (..., T) mask -> (..., H): the hidden state at each sequence's last real token
    (position 0 for a sequence without one)."""
    index = last_token_index(mask).clamp_min(0)
    return torch.take_along_dim(hidden, index[..., None, None], dim=-2).squeeze(-2)


def apply_head(last_hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None) -> torch.Tensor:
    """(..., H) -> (...) rewards: the scalar head, in fp32 (fp64 for fp64 hidden)."""
    acc = accumulate_dtype(last_hidden.dtype)
    rewards = last_hidden.to(acc) @ head_weight.reshape(-1).to(acc)
    if head_bias is not None:
        rewards = rewards + head_bias.reshape(()).to(acc)
    return rewards
