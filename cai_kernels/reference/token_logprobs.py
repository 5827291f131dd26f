"""token_logprobs in plain PyTorch: the definition the kernels are tested against.

Conventions shared by every log-prob op (token_logprobs, linear_token_logprobs, choice_logprobs):
  * scores are computed in fp32 (fp64 when the input is fp64), whatever the input dtype;
  * ``temperature`` divides the logits before the softmax;
  * a position whose target equals ``ignore_index`` gets log-prob 0, entropy 0 and no gradient.
"""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int | None = None, return_entropy: bool = False):
    """log p(target) under softmax(logits / temperature), per position.

    Args:
        logits: (..., V) fp32 / bf16 / fp16 / fp64, any strides.
        targets: (...) int64 in [0, V), or ``ignore_index``.
    Returns:
        logprobs (...) fp32 (fp64 for fp64 logits); with ``return_entropy`` also the entropy (...)
        of softmax(logits / temperature) at each position, same dtype.
    """
    ignored = (targets == ignore_index) if ignore_index is not None else torch.zeros_like(targets, dtype=torch.bool)
    scaled = logits.to(accumulate_dtype(logits.dtype)) / temperature
    # an ignored row is never read: whatever it holds (NaN, inf) must not reach its gradient through
    # log_softmax's backward (which mixes the whole row even where the upstream gradient is 0)
    scaled = torch.where(ignored.unsqueeze(-1), 0.0, scaled)
    log_probs = scaled.log_softmax(dim=-1)
    safe_targets = targets.masked_fill(ignored, 0)
    target_logprobs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    target_logprobs = target_logprobs.masked_fill(ignored, 0.0)
    if not return_entropy:
        return target_logprobs
    probs = log_probs.exp()
    # p * log p with p == 0 (a -inf logit) contributes 0, not 0 * -inf = NaN (and so does its
    # gradient: the -inf is masked before the product); a NaN stays NaN
    entropy = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)
    return target_logprobs, entropy.masked_fill(ignored, 0.0)
