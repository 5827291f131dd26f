"""Public ops, one module each (``ops/<op>.py``): argument checks, the parameter bundle, backend dispatch,
the torch.library custom ops (``_kernel_op.KernelOp``) and their autograd formulas."""

from .choice_logprobs import choice_logprobs
from .gae import gae
from .kl_penalty import kl_penalty
from .last_token_rewards import last_token_rewards
from .linear_token_logprobs import linear_token_logprobs
from .masked_whiten import masked_whiten
from .pairwise_loss import pairwise_loss
from .ppo_advantages import ppo_advantages
from .ppo_policy_loss import ppo_policy_loss
from .ppo_value_loss import ppo_value_loss
from .ranked_pairwise_loss import ranked_pairwise_loss
from .reward_pairwise_loss import reward_pairwise_loss
from .reward_ranked_loss import reward_ranked_loss
from .token_logprobs import token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "choice_logprobs", "pairwise_loss", "last_token_rewards",
           "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss", "kl_penalty", "gae", "masked_whiten",
           "ppo_advantages", "ppo_policy_loss", "ppo_value_loss"]
