"""Public ops: validation, backend dispatch, torch.library registration and autograd."""

from .token_logprobs import token_logprobs

__all__ = ["token_logprobs"]
