"""choice_logprobs: multiple-choice scores, the feedback model's labels in CAI.

Every option of every question is a continuation of its prompt; the caller runs the model once and
hands over, for each option token, either the logits that predict it or the hidden state there
(the LM head is then applied at those positions only, fused with the log-probs). Per token:
log p(token) (``token_logprobs`` / ``linear_token_logprobs``); per option: their sum; per question: a
softmax over its options, optionally clamped (CAI clamps chain-of-thought labels to (0.4, 0.6)).

The option step is the custom op ``cai_kernels::option_scores`` (C++ / Triton kernel, a fake
implementation with a data-dependent K = max(num_options), an autograd formula), so the whole op is
differentiable w.r.t. logits / hidden / weight / bias and torch.compile traces it without a graph
break (with the compiled backends; the reference backend reads K from the data in Python).
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import ChoiceLogprobsParams
from .._validation import (check_float_tensor, check_linear_operands, check_option_layout, check_positive_float,
                           check_probability_clamp, check_same_device, check_shape, check_targets,
                           check_targets_in_range, check_tensor)
from ..reference.choice_logprobs import choice_logprobs as reference
from ._kernel_op import KernelOp, traced
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

_option_scores = KernelOp("option_scores", op="choice_logprobs", kernel="option_scores",
                          args="Tensor token_logprobs, Tensor option_ids, Tensor num_options",
                          params=ChoiceLogprobsParams, returns="(Tensor, Tensor, Tensor)")


@_option_scores.register_fake
def _(token_logprobs, option_ids, num_options, params):
    max_options = torch.library.get_ctx().new_dynamic_size()  # K = max(num_options): read from the data
    shape = (num_options.shape[0], max_options)
    return token_logprobs.new_empty(shape), token_logprobs.new_empty(shape), option_ids.new_empty(option_ids.shape)


def _setup_context(ctx, args, params, backend, output):
    option_logprobs, _, option_slot = output
    ctx.save_for_backward(option_logprobs, option_slot)
    ctx.clamp = (params.clamp_lo, params.clamp_hi) if params.clamp_lo is not None else None


def _backward_formula(ctx, grad_option_logprobs, grad_probs, _grad_slot):
    """Through the softmax (p (g - sum p g)) and the clamp (no gradient where it bites, as torch.clamp),
    then each token takes its option's gradient: a gather through option_slot."""
    if grad_option_logprobs is None and grad_probs is None:
        return None, None, None
    option_logprobs, option_slot = ctx.saved_tensors
    grad = torch.zeros_like(option_logprobs) if grad_option_logprobs is None else grad_option_logprobs
    if grad_probs is not None:
        probs = option_logprobs.softmax(dim=-1)  # before the clamp; padding (-inf) has p = 0
        if ctx.clamp is not None:
            grad_probs = grad_probs * ((probs >= ctx.clamp[0]) & (probs <= ctx.clamp[1]))
        grad = grad + probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))
    return torch.take(grad, option_slot), None, None


_option_scores.register_autograd(_backward_formula, setup_context=_setup_context)


def _check_scores_source(targets, logits, hidden, weight, bias) -> None:
    """Exactly one of logits (N, V) or hidden (N, H) + weight (V, H) [+ bias (V,)]."""
    if logits is not None and (hidden is not None or weight is not None or bias is not None):
        raise ValueError("pass either logits, or hidden + weight (+ bias), not both")
    if logits is not None:
        check_float_tensor("logits", logits, ndim=2)
        if logits.size(-1) == 0:
            raise ValueError(f"logits must have a non-empty last (vocabulary) dimension; got shape {tuple(logits.shape)}")
        check_targets("targets", targets, lead_shape=logits.shape[:-1], what="one per row of logits (N,)")
        return
    if hidden is None or weight is None:
        raise ValueError("pass logits (N, V), or hidden (N, H) with weight (V, H) (and optionally bias (V,)); "
                         f"got hidden={'a tensor' if hidden is not None else None}, "
                         f"weight={'a tensor' if weight is not None else None}")
    check_linear_operands(hidden, weight, bias)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have 2 dimensions (N, H); got shape {tuple(hidden.shape)}")
    check_targets("targets", targets, lead_shape=hidden.shape[:-1], what="one per row of hidden (N,)")


def choice_logprobs(targets: torch.Tensor, option_ids: torch.Tensor, num_options: torch.Tensor, *,
                    logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, clamp: tuple[float, float] | None = None,
                    backend: str | None = None):
    """Multiple-choice scores: summed log-probs per option, normalized over each question's options.

    Args:
        targets: (N,) int64, the tokens of every option continuation of every question, flattened, each in
            [0, V): else a ValueError on CPU tensors (and in ``cai_kernels.debug()`` mode), NaN scores for that
            token's option on a GPU.
        option_ids: (N,) int64, the option of each token in [0, O); options are numbered question by
            question (question 0's options first); tokens may come in any order.
        num_options: (Q,) int64, options per question, each >= 1, summing to O.
        logits: (N, V) fp32 / bf16 / fp16 (fp64), the logits at the positions that predict each token; or
        hidden: (N, H) with weight (V, H) [and bias (V,)], one dtype: the LM head applied at those
            positions only (never forms the (N, V) logits).
        temperature: > 0, divides the logits.
        clamp: None, or (lo, hi) with 0 <= lo <= hi <= 1: the normalized probabilities are clamped.
        backend: "reference" | "cpu" | "triton" | None (auto: follows the device).
    Returns:
        option_logprobs (Q, K) and probs (Q, K), K = max(num_options), fp32 (fp64 for fp64 inputs):
        option_logprobs[q, k] = sum of log p(token) over option k of question q (-inf for k >= num_options[q]);
        probs[q] = softmax over the question's options (0 in the padding), clamped.
        Differentiable w.r.t. logits / hidden / weight / bias (no gradient through a clamped probability).
    Synchronization: K sizes the outputs, so the option step reads num_options' data once on the host (one
    synchronization on a GPU, which also carries the layout checks: num_options >= 1, ids in [0, O), every
    option with a token, else ValueError); this op cannot be captured in a CUDA graph.
    Under torch.compile K is a data-dependent size; inductor (torch 2.13) cannot lower a column select
    ``probs[:, k]`` of such a tensor (a guard on K == 1): use ``probs.narrow(1, k, 1)`` or ``gather``.
    """
    check_tensor("targets", targets, dtypes=(torch.int64,), ndim=1)
    check_tensor("option_ids", option_ids, dtypes=(torch.int64,))
    check_shape("option_ids", option_ids, targets.shape, "one option id per token: targets.shape")
    check_tensor("num_options", num_options, dtypes=(torch.int64,), ndim=1)
    _check_scores_source(targets, logits, hidden, weight, bias)
    check_same_device(("targets", "option_ids", "num_options", "logits", "hidden", "weight", "bias"), targets,
                      option_ids, num_options, logits, hidden, weight, bias)
    temperature = check_positive_float("temperature", temperature)
    clamp = check_probability_clamp("clamp", clamp)
    device = targets.device
    chosen = _registry.select_backend("choice_logprobs", device, backend)
    if chosen == "reference":
        if device.type == "meta":
            raise ValueError("choice_logprobs' reference backend cannot run on meta tensors: the width K = "
                             "max(num_options) of its outputs is read from num_options' data (trace the compiled "
                             "backends under torch.compile instead: they give K as a data-dependent size)")
        if not traced():
            vocab = logits.size(-1) if logits is not None else weight.size(0)
            check_targets_in_range("targets", targets, vocab, None)
            check_option_layout(option_ids, num_options)
        return reference(targets, option_ids, num_options, logits=logits, hidden=hidden, weight=weight, bias=bias,
                         temperature=temperature, clamp=clamp)
    if logits is not None:
        token_lp = token_logprobs(logits, targets, temperature=temperature, backend=chosen)
    else:
        token_lp = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, backend=chosen)
    params = ChoiceLogprobsParams(*(clamp if clamp is not None else (None, None)))
    option_logprobs, probs, _ = _option_scores(token_lp, option_ids.contiguous(), num_options.contiguous(),
                                               params=params, backend=chosen)
    return option_logprobs, probs
