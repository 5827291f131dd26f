"""ppo_advantages in plain PyTorch: KL -> shaped rewards -> GAE -> whitened advantages."""

from __future__ import annotations

import torch

from .._validation import compute_dtype
from .gae import gae
from .kl_penalty import kl_penalty
from .masked_whiten import masked_whiten


def last_token_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """True at each row's last response token (none in a row without response tokens)."""
    mask = response_mask != 0
    return mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))


def shape_rewards(kl: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor, *,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO: -kl_coef * kl on response tokens, plus the sequence's score
    at its last response token (TRL / OpenRLHF ``compute_rewards``); 0 on masked positions."""
    mask = response_mask != 0
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    return rewards + torch.where(last_token_mask(response_mask), scores.to(kl.dtype)[:, None], 0.0)


def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   values: torch.Tensor, response_mask: torch.Tensor, *, kl_coef: float, gamma: float = 1.0,
                   lam: float = 0.95, estimator: str = "k1", whiten: bool = True):
    """The post-rollout step of RLHF-PPO: KL -> shaped rewards -> GAE -> whitened advantages.

    Returns (advantages, returns, token_rewards, kl), each (B, T): ``kl`` is the per-token estimate
    (0 on masked positions), ``token_rewards`` the shaped rewards, ``returns`` = raw advantages +
    values, ``advantages`` whitened over the batch's response tokens when ``whiten``.
    """
    dtype = compute_dtype(logprobs, ref_logprobs, values)
    logprobs, ref_logprobs, values = logprobs.to(dtype), ref_logprobs.to(dtype), values.to(dtype)
    kl = torch.where(response_mask != 0, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    token_rewards = shape_rewards(kl, scores, response_mask, kl_coef=kl_coef)
    advantages, returns = gae(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns, token_rewards, kl
