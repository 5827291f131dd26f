"""choice_logprobs in plain PyTorch: multiple-choice scores (conventions in token_logprobs.py)."""

from __future__ import annotations

import math

import torch

from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs


def option_scores(token_logprobs: torch.Tensor, option_ids: torch.Tensor, num_options: torch.Tensor, *,
                  clamp: tuple[float, float] | None = None):
    """Per-option sums of token log-probs, normalized over each question's options.

    Args:
        token_logprobs: (N,) log p of every option token, fp32 (fp64 kept as fp64).
        option_ids: (N,) int64, the option of each token; options numbered question by question.
        num_options: (Q,) int64, options per question (each >= 1); K = max(num_options).
        clamp: (lo, hi) applied to the normalized probabilities of real options, or None.
    Returns:
        option_logprobs (Q, K): sum of the option's token log-probs, -inf where k >= num_options[q];
        probs (Q, K): softmax over the question's options, clamped, 0 where k >= num_options[q].
    """
    num_questions, num_opts = num_options.numel(), int(num_options.sum())
    max_options = int(num_options.max()) if num_questions else 0
    option_sums = token_logprobs.new_zeros(num_opts).index_add(0, option_ids, token_logprobs)
    question = torch.repeat_interleave(torch.arange(num_questions, device=num_options.device), num_options)
    first_option = torch.cumsum(num_options, 0) - num_options
    slot = torch.arange(num_opts, device=num_options.device) - first_option[question]
    option_logprobs = token_logprobs.new_full((num_questions, max_options), -math.inf)
    option_logprobs = option_logprobs.index_put((question, slot), option_sums)
    probs = option_logprobs.softmax(dim=-1)
    if clamp is not None:
        probs = probs.clamp(*clamp)
    real = torch.arange(max_options, device=num_options.device) < num_options[:, None]
    return option_logprobs, probs.masked_fill(~real, 0.0)


def choice_logprobs(targets: torch.Tensor, option_ids: torch.Tensor, num_options: torch.Tensor, *,
                    logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, clamp: tuple[float, float] | None = None):
    """Multiple-choice scores: log p of each option's tokens summed per option, softmax per question.

    Args:
        targets: (N,) int64, the tokens of every option of every question, flattened.
        option_ids, num_options, clamp: as in ``option_scores``.
        logits: (N, V) at the positions that predict each token, or
        hidden: (N, H) with weight (V, H) [and bias (V,)]: the LM head applied at those positions only.
    Returns:
        (option_logprobs (Q, K), probs (Q, K)), see ``option_scores``.
    """
    if logits is not None:
        token_lp = token_logprobs(logits, targets, temperature=temperature)
    else:
        token_lp = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    return option_scores(token_lp, option_ids, num_options, clamp=clamp)
