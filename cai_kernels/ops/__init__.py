"""Public ops: validation, backend dispatch, torch.library registration and autograd."""

from .advantages import gae, masked_whiten, ppo_advantages
from .kl_penalty import kl_penalty
from .ppo_losses import ppo_policy_loss, ppo_value_loss
from .token_logprobs import token_logprobs

__all__ = ["gae", "kl_penalty", "masked_whiten", "ppo_advantages", "ppo_policy_loss", "ppo_value_loss",
           "token_logprobs"]
