"""Public ops: validation, backend dispatch, torch.library registration and autograd."""

from .choice_logprobs import choice_logprobs
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["choice_logprobs", "linear_token_logprobs", "token_logprobs"]
