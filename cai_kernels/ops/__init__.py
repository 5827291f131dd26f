"""Public ops: validation, backend dispatch, torch.library registration and autograd."""

from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["linear_token_logprobs", "token_logprobs"]
