"""ranked_pairwise_loss in plain PyTorch: InstructGPT's loss over all pairs of K ranked responses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import accumulate_dtype
from ._reductions import reduce_loss


def ranked_pairwise_loss(rewards: torch.Tensor, *, num_valid: torch.Tensor | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """InstructGPT's ranking loss: K responses per prompt ranked best first, every pair (i above j).

        row_loss[b] = mean over pairs i < j < n_b of -logsigmoid(r[b, i] - r[b, j])

    Written with the explicit (B, K, K) matrix of differences: the definition, not the kernel (which
    loops over pairs in O(B K) memory).

    Args:
        rewards: (B, K), row b ranked best first; entries at k >= n_b are ignored.
        num_valid: (B,) integers in [0, K], n_b; None means K for every row.
        reduction: "none" -> row_loss (B,) (0 for rows with fewer than 2 valid responses);
            "sum" -> its sum; "mean" -> its mean over the rows that have at least one pair (each prompt
            weighs the same, however many responses it has, as in InstructGPT), 0 if no row has one.
    """
    B, K = rewards.shape
    n = torch.full((B,), K, device=rewards.device) if num_valid is None else num_valid
    positions = torch.arange(K, device=rewards.device)
    valid = positions[None, :] < n[:, None]
    # float64 whatever the input dtype (rounded once at the end): r_i - r_j of finite fp32 rewards can
    # overflow fp32. Padding (k >= n_b) is never read: zeroed before any arithmetic, so that NaN there
    # cannot reach a gradient through 0 * NaN.
    r = torch.where(valid, rewards.to(torch.float64), 0.0)
    # pair[b, i, j]: i is ranked above j and both are valid responses of row b
    pair = (positions[:, None] < positions[None, :]) & valid[:, None, :]
    # only real pairs are differenced: r_k - r_k of an infinite reward is NaN, which logsigmoid's backward
    # would multiply into the gradient even where the pair is masked out
    difference = torch.where(pair, r[:, :, None] - r[:, None, :], 0.0)
    pair_loss = torch.where(pair, -F.logsigmoid(difference), 0.0)
    pairs = pair.sum((1, 2))
    row_loss = pair_loss.sum((1, 2)) / pairs.clamp_min(1)
    if reduction == "mean":
        loss = row_loss.sum() / (pairs > 0).sum().clamp_min(1)
    else:
        loss = reduce_loss(row_loss, reduction)
    return loss.to(accumulate_dtype(rewards.dtype))
