"""Reference log-prob ops in plain PyTorch: the definitions the kernels are tested against.

Conventions shared by every log-prob op:
  * scores are computed in fp32 (fp64 when the input is fp64), whatever the input dtype;
  * ``temperature`` divides the logits before the softmax;
  * a position whose target equals ``ignore_index`` gets log-prob 0, entropy 0 and no gradient.
"""

from __future__ import annotations

import math

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    scaled = logits.to(accumulate_dtype(logits.dtype)) / temperature
    log_probs = scaled.log_softmax(dim=-1)
    ignored = (targets == ignore_index) if ignore_index is not None else torch.zeros_like(targets, dtype=torch.bool)
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
    logits = torch.nn.functional.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


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
