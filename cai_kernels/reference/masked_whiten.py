"""masked_whiten in plain PyTorch: batch-global statistics over response tokens (TRL / veRL)."""

from __future__ import annotations

import torch

from .._validation import compute_dtype


def masked_moments(x: torch.Tensor, response_mask: torch.Tensor, *, unbiased: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, variance) of ``x`` over all masked-in elements of the batch (two passes).

    Empty mask: mean 0, variance 0. A single element with ``unbiased``: variance 0 (Bessel's
    correction is undefined there; TRL raises, we return the biased value).
    """
    mask = response_mask != 0
    count = mask.sum()
    n = count.clamp(min=1).to(x.dtype)
    mean = torch.where(mask, x, 0.0).sum() / n
    squares = torch.where(mask, (x - mean).square(), 0.0).sum()
    denominator = (count - 1).clamp(min=1).to(x.dtype) if unbiased else n
    return count, mean, squares / denominator


def masked_whiten(x: torch.Tensor, response_mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over *all* masked-in elements of the batch.

    As TRL's and veRL's ``masked_whiten``: batch-global statistics, unbiased variance by default,
    ``shift_mean=False`` adds the mean back. Masked positions are 0 in the output (TRL leaves
    whitened padding garbage there). (B, T) in, (B, T) fp32 (fp64 for fp64) out.
    """
    x = x.to(compute_dtype(x))
    _, mean, var = masked_moments(x, response_mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(response_mask != 0, whitened, 0.0)
