"""linear_token_logprobs in plain PyTorch: the LM head, then token_logprobs (conventions there)."""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype
from .token_logprobs import token_logprobs


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int | None = None, return_entropy: bool = False):
    """token_logprobs of the logits ``hidden @ weight.T + bias``: the plain formula, full logits.

    Args:
        hidden: (..., H); weight: (V, H); bias: (V,) or None; all of one float dtype.
        targets: (...) int64 in [0, V), or ``ignore_index``.
    Returns:
        as ``token_logprobs``: logprobs (...) fp32 (fp64 for fp64 inputs) [, entropy (...)].
    Memory: materializes the (..., V) logits in fp32 (the fused kernels never do).
    """
    acc = accumulate_dtype(hidden.dtype)
    hidden = hidden.to(acc)
    if ignore_index is not None:
        # ignored rows are never read: NaN there must not reach grad_weight through 0 * NaN in the GEMM
        hidden = torch.where((targets == ignore_index).unsqueeze(-1), 0.0, hidden)
    logits = torch.nn.functional.linear(hidden, weight.to(acc), None if bias is None else bias.to(acc))
    return token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)
