"""The math of every op in plain PyTorch: ground truth for tests, baseline for benchmarks,
fallback when no compiled backend is present. One function per op; nobody re-derives them."""

from .logprobs import token_logprobs
from .ppo import gae, kl_penalty, masked_whiten, ppo_advantages, ppo_policy_loss, ppo_value_loss, shape_rewards

__all__ = ["token_logprobs", "kl_penalty", "gae", "masked_whiten", "shape_rewards", "ppo_advantages",
           "ppo_policy_loss", "ppo_value_loss"]
