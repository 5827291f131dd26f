"""Public ops: validation, backend dispatch, torch.library registration and autograd."""

from .advantages import gae, masked_whiten, ppo_advantages
from .choice_logprobs import choice_logprobs
from .kl_penalty import kl_penalty
from .last_token_rewards import last_token_rewards
from .linear_token_logprobs import linear_token_logprobs
from .pairwise_loss import pairwise_loss
from .ppo_losses import ppo_policy_loss, ppo_value_loss
from .ranked_pairwise_loss import ranked_pairwise_loss
from .reward_losses import reward_pairwise_loss, reward_ranked_loss
from .token_logprobs import token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "choice_logprobs", "pairwise_loss", "last_token_rewards",
           "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss", "gae", "kl_penalty", "masked_whiten",
           "ppo_advantages", "ppo_policy_loss", "ppo_value_loss"]
