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

    Computed in float64 whatever the input dtype, rounded once at the end: in fp32 the squares of inputs
    near 1e20 overflow (every output 0), and a mean near 1e8 rounded to fp32 is off by up to 4, a shift
    of every whitened value by 4 / std.
    """
    mask = response_mask != 0
    x64 = torch.where(mask, x.to(torch.float64), 0.0)  # masked positions (NaN, inf) are never read
    _, mean, var = masked_moments(x64, mask, unbiased=unbiased)
    whitened = (x64 - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(compute_dtype(x))
