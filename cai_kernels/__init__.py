"""cai-kernels: fused CPU (C++ SIMD + OpenMP) and GPU (Triton) kernels for Constitutional AI.

Every op has a reference PyTorch implementation (``cai_kernels.reference``) and compiled backends
chosen per call by the tensors' device (``backend=`` or env CAI_KERNELS_BACKEND to force one).
``python -m cai_kernels info`` says which backends are live on this machine and why.
``cai_kernels.debug()`` (or CAI_KERNELS_DEBUG=1) checks bad data on the host for GPU tensors too.
"""

from ._registry import BACKENDS, OPS, select_backend
from ._validation import debug, debug_enabled
from .ops import (choice_logprobs, gae, kl_penalty, last_token_rewards, linear_token_logprobs, masked_whiten,
                  pairwise_loss, ppo_advantages, ppo_policy_loss, ppo_value_loss, ranked_pairwise_loss,
                  reward_pairwise_loss, reward_ranked_loss, token_logprobs)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "OPS", "select_backend", "debug", "debug_enabled", "token_logprobs", "linear_token_logprobs", "choice_logprobs",
           "pairwise_loss", "last_token_rewards", "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss",
           "kl_penalty", "gae", "masked_whiten", "ppo_advantages", "ppo_policy_loss", "ppo_value_loss", "__version__"]
