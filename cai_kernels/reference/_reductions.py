"""Reductions shared by the reference losses: over pairs (pairwise / ranked losses) and over response
tokens (the PPO losses, ``agg`` modes)."""

from __future__ import annotations

import torch

from .._params import AGG_MODES


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def agg_loss(loss: torch.Tensor, response_mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over response tokens.

      token-mean           sum of all token losses / number of response tokens
      seq-mean-token-mean  each row's token mean, averaged over rows that have response tokens
      seq-mean-token-sum   each row's token sum, averaged over rows that have response tokens
    Rows without response tokens are left out of the seq-mean modes (veRL's plain mean would make
    them NaN); with no response token at all the loss is 0.
    """
    mask = response_mask != 0
    token_sums = torch.where(mask, loss, 0.0).sum(-1)
    counts = mask.sum(-1).to(loss.dtype)
    if agg == "token-mean":
        return token_sums.sum() / counts.sum().clamp(min=1)
    nonempty = counts > 0
    rows = nonempty.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return torch.where(nonempty, token_sums / counts.clamp(min=1), 0.0).sum() / rows
    if agg == "seq-mean-token-sum":
        return token_sums.sum() / rows
    raise ValueError(f"agg must be one of {tuple(AGG_MODES)}; got {agg!r}")


def masked_mean(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask != 0
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
