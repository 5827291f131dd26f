"""Reference preference-model (PM) losses in plain PyTorch: the definitions the kernels are tested against.

Conventions shared by every PM op:
  * a reward is one scalar per sequence: the scalar head applied to the hidden state of the
    sequence's last real token, where "last" is the highest position whose mask is nonzero (right
    padding, left padding and masks with holes all work);
  * losses are computed in fp32 (fp64 when the rewards / hidden states are fp64), whatever the input dtype;
  * soft labels p = P(chosen is preferred) in [0, 1] (RL-CAI trains its PM on the feedback model's
    probabilities; p = 1 is the usual hard label); labels and margins are targets: no gradient flows
    into them;
  * -logsigmoid(d) = softplus(-d) is evaluated in a form that is exact for |d| up to the dtype's range
    (stacks that write ``log(sigmoid(d))`` return -inf once sigmoid underflows, d < -88 in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logprobs import accumulate_dtype

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                  soft_labels: torch.Tensor | float | None = None, margin: torch.Tensor | float | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Bradley–Terry loss with soft labels, per pair:

        d    = chosen - rejected - margin
        loss = -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d))

    the cross-entropy between the label p and the model's P(chosen > rejected) = sigmoid(d); with
    p = 1 it is TRL's / OpenRLHF's ``-logsigmoid(chosen - rejected - margin)``.

    Args:
        chosen_rewards, rejected_rewards: (...) same shape, fp32 / bf16 / fp16 / fp64.
        soft_labels: P(chosen preferred), a float or a tensor broadcastable to the rewards' shape,
            values in [0, 1]; None means 1.
        margin: a float or a tensor broadcastable to the rewards' shape; None means 0.
        reduction: "mean" | "sum" | "none".
    Returns:
        fp32 (fp64 for fp64 rewards): a scalar, or (...) with reduction="none".
    """
    acc = accumulate_dtype(chosen_rewards.dtype)
    d = chosen_rewards.to(acc) - rejected_rewards.to(acc)
    if margin is not None:
        d = d - (margin.detach().to(acc) if isinstance(margin, torch.Tensor) else margin)
    p = 1.0 if soft_labels is None else soft_labels
    if isinstance(p, torch.Tensor):
        p = p.detach().to(acc)
    loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    return _reduce(loss, reduction)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(..., T) mask (nonzero = real token) -> (...) int64: the highest real position, -1 if none."""
    positions = torch.arange(mask.size(-1), device=mask.device)
    return torch.where(mask != 0, positions, -1).amax(-1)


def last_token_rewards(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar head applied to each sequence's last real token.

    Args:
        hidden: (..., T, H) fp32 / bf16 / fp16 / fp64, any strides.
        mask: (..., T) bool or integer, nonzero = real token; every sequence needs one (a sequence with
            none gets the head applied to position 0: the public ops reject it before).
        head_weight: (H,) or (1, H); head_bias: 0-d / 1-element tensor or None.
    Returns:
        (...) rewards, fp32 (fp64 for fp64 hidden).
    """
    acc = accumulate_dtype(hidden.dtype)
    index = last_token_index(mask).clamp_min(0)
    last_hidden = torch.take_along_dim(hidden, index[..., None, None], dim=-2).squeeze(-2)
    rewards = last_hidden.to(acc) @ head_weight.reshape(-1).to(acc)
    if head_bias is not None:
        rewards = rewards + head_bias.reshape(()).to(acc)
    return rewards


def reward_pairwise_loss(chosen_hidden: torch.Tensor, chosen_mask: torch.Tensor, rejected_hidden: torch.Tensor,
                         rejected_mask: torch.Tensor, head_weight: torch.Tensor,
                         head_bias: torch.Tensor | None = None, *, soft_labels=None, margin=None):
    """One PM step from hidden states: rewards at each sequence's last real token, then the mean
    ``pairwise_loss``. Returns (loss, chosen_rewards (B,), rejected_rewards (B,))."""
    chosen_rewards = last_token_rewards(chosen_hidden, chosen_mask, head_weight, head_bias)
    rejected_rewards = last_token_rewards(rejected_hidden, rejected_mask, head_weight, head_bias)
    loss = pairwise_loss(chosen_rewards, rejected_rewards, soft_labels=soft_labels, margin=margin)
    return loss, chosen_rewards, rejected_rewards


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
    acc = accumulate_dtype(rewards.dtype)
    r = rewards.to(acc)
    B, K = r.shape
    n = torch.full((B,), K, device=r.device) if num_valid is None else num_valid
    positions = torch.arange(K, device=r.device)
    # pair[b, i, j]: i is ranked above j and both are valid responses of row b
    pair = (positions[:, None] < positions[None, :]) & (positions[None, None, :] < n[:, None, None])
    difference = r[:, :, None] - r[:, None, :]
    pair_loss = torch.where(pair, -F.logsigmoid(difference), 0.0)
    pairs = pair.sum((1, 2))
    row_loss = pair_loss.sum((1, 2)) / pairs.clamp_min(1)
    if reduction == "mean":
        return row_loss.sum() / (pairs > 0).sum().clamp_min(1)
    return _reduce(row_loss, reduction)


def reward_ranked_loss(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None, *, num_valid: torch.Tensor | None = None):
    """Ranked PM step from hidden states (B, K, T, H) and masks (B, K, T): rewards (B, K) at each response's
    last real token (0 for responses k >= n_b, which may be all padding), then the mean
    ``ranked_pairwise_loss``. Returns (loss, rewards)."""
    rewards = last_token_rewards(hidden, mask, head_weight, head_bias)
    if num_valid is not None:
        valid = torch.arange(rewards.size(1), device=rewards.device) < num_valid[:, None]
        rewards = rewards.masked_fill(~valid, 0.0)
    return ranked_pairwise_loss(rewards, num_valid=num_valid), rewards
