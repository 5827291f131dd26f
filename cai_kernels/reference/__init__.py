"""The math of every op in plain PyTorch: ground truth for tests, baseline for benchmarks,
fallback when no compiled backend is present. One function per op; nobody re-derives them."""

from .logprobs import choice_logprobs, linear_token_logprobs, option_scores, token_logprobs
from .pairwise import (last_token_rewards, pairwise_loss, ranked_pairwise_loss, reward_pairwise_loss,
                       reward_ranked_loss)
from .ppo import gae, kl_penalty, masked_whiten, ppo_advantages, ppo_policy_loss, ppo_value_loss, shape_rewards

__all__ = ["choice_logprobs", "linear_token_logprobs", "option_scores", "token_logprobs", "pairwise_loss",
           "last_token_rewards", "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss", "kl_penalty",
           "gae", "masked_whiten", "shape_rewards", "ppo_advantages", "ppo_policy_loss", "ppo_value_loss"]
