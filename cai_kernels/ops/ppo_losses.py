"""ppo_policy_loss and ppo_value_loss: PPO's clipped losses over response tokens, fused.

One read of the inputs forward (per-row partial sums merged in row order: deterministic), one read
and one write backward. The compiled backends run as the custom op ``cai_kernels::ppo_loss`` (both
losses; a fake implementation and an autograd formula registered), so torch.compile traces training
steps that call them without a graph break.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._extension import cpu_kernels
from ..reference import ppo as reference
from ._ppo_args import (accumulate_dtype, as_rows, call_kernel_directly, check_choice, check_mask, check_number,
                        check_rows, check_same_device, detached, kernel_mask)

AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2}
POLICY_STATS = ("clipfrac", "dual_clipfrac", "approx_kl", "approx_kl_k1")
NO_CLIP = -1.0  # stands for dual_clip=None / clip=None in the kernels' signatures


def _kernels(backend: str):
    if backend == "cpu":
        return cpu_kernels
    from ..triton import ppo
    return ppo


# One custom op serves both losses (kind 0: policy, 1: value); see csrc/cpu/ppo_losses.cpp for the
# meaning of (x, y, z) and p0..p2 per kind.
POLICY, VALUE = 0, 1


@torch.library.custom_op("cai_kernels::ppo_loss", mutates_args=())
def _ppo_loss(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, kind: int, p0: float, p1: float,
              p2: float, agg: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels(backend).ppo_loss_fwd(x, y, z, mask, kind, p0, p1, p2, agg)


@_ppo_loss.register_fake
def _(x, y, z, mask, kind, p0, p1, p2, agg, backend):
    acc = accumulate_dtype(x.dtype)
    n_stats = 1 + (len(POLICY_STATS) if kind == POLICY else 1)
    return x.new_empty(n_stats, dtype=acc), x.new_empty(x.size(0), dtype=acc)


@torch.library.custom_op("cai_kernels::ppo_loss_backward", mutates_args=())
def _ppo_loss_backward(grad_loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                       mask: torch.Tensor, row_weights: torch.Tensor, kind: int, p0: float, p1: float, p2: float,
                       backend: str) -> torch.Tensor:
    return _kernels(backend).ppo_loss_bwd(grad_loss, x, y, z, mask, row_weights, kind, p0, p1, p2)


@_ppo_loss_backward.register_fake
def _(grad_loss, x, y, z, mask, row_weights, kind, p0, p1, p2, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, y, z, mask, kind, p0, p1, p2, _agg, backend = inputs
    ctx.save_for_backward(x, y, z, mask, output[1])
    ctx.constants = (kind, p0, p1, p2, backend)


def _backward(ctx, grad_stats, _grad_weights):
    x, y, z, mask, row_weights = ctx.saved_tensors
    grad = _ppo_loss_backward(grad_stats[0].contiguous(), x, y, z, mask, row_weights, *ctx.constants)
    return grad, None, None, None, None, None, None, None, None, None


_ppo_loss.register_autograd(_backward, setup_context=_setup_context)


def _clipped_loss(kind: int, differentiable: torch.Tensor, args: tuple, backend: str) -> torch.Tensor:
    """The stats vector [loss, ...] of one loss, straight from the kernel when no gradient is needed."""
    if call_kernel_directly(differentiable):
        return _kernels(backend).ppo_loss_fwd(*args[:4], kind, *args[4:])[0]
    return _ppo_loss(*args[:4], kind, *args[4:], backend)[0]


def _check_loss_inputs(names: tuple[str, str, str], tensors, response_mask):
    check_rows(names[0], tensors[0])
    shape = tuple(tensors[0].shape)
    for name, t in zip(names[1:], tensors[1:]):
        check_rows(name, t, shape=shape, what=f"like {names[0]}")
    check_mask("response_mask", response_mask, shape)
    check_same_device(**dict(zip(names, tensors)), response_mask=response_mask)


def _check_agg(agg) -> int:
    return AGG_CODES[check_choice("agg", agg, reference.AGG_MODES)]


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: float | None = None, agg: str = "token-mean", backend: str | None = None):
    """PPO's clipped surrogate loss over response tokens, with optional dual clip (veRL conventions).

    Per response token, log_ratio = clamp(logprobs - old_logprobs, -20, 20) (clamped *before* exp:
    no inf, no NaN, whatever the inputs), ratio = exp(log_ratio):
        loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (dual_clip = c > 1), where A < 0:  loss_t = min(loss_t, -A * c)
    reduced by ``agg`` over response tokens:
        "token-mean"           sum / number of response tokens
        "seq-mean-token-mean"  mean over rows (that have response tokens) of each row's token mean
        "seq-mean-token-sum"   mean over rows (that have response tokens) of each row's token sum
    No response token at all: loss 0 and stats 0 (never NaN).

    Args:
        logprobs: (B, T) current policy log-probs, fp32 / bf16 / fp16 / fp64, any strides.
        old_logprobs, advantages: (B, T), the rollout's log-probs and (whitened) advantages.
        response_mask: (B, T), nonzero = response token.
        clip_low in [0, 1), clip_high >= 0 (asymmetric "clip-higher" allowed); dual_clip None or > 1.
    Returns:
        (loss, stats): loss a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable w.r.t.
        logprobs only (old_logprobs and advantages are constants); stats a dict of detached 0-d
        tensors, means over response tokens: "clipfrac" (the clipped term is the larger),
        "dual_clipfrac" (the dual-clip bound is taken; 0 without dual_clip), "approx_kl"
        (mean of (ratio - 1) - log_ratio, k3 of KL(old || new), as CleanRL) and "approx_kl_k1"
        (mean of -log_ratio, veRL's ppo_kl).
    """
    _check_loss_inputs(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), response_mask)
    clip_low = check_number("clip_low", clip_low, low=0.0, high=1.0)
    if clip_low == 1.0:
        raise ValueError("clip_low must be a finite number in [0, 1); got 1.0")
    clip_high = check_number("clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = check_number("dual_clip", dual_clip, low=1.0, low_open=True)
    agg_code = _check_agg(agg)
    chosen = _registry.select_backend("ppo_policy_loss", logprobs.device, backend)
    old_logprobs, advantages = detached(old_logprobs), detached(advantages)
    if chosen == "reference":
        return reference.ppo_policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low,
                                         clip_high=clip_high, dual_clip=dual_clip, agg=agg)
    args = (*as_rows(logprobs, old_logprobs, advantages), kernel_mask(response_mask), 1.0 - clip_low, 1.0 + clip_high,
            NO_CLIP if dual_clip is None else dual_clip, agg_code)
    stats = _clipped_loss(POLICY, logprobs, args, chosen)
    return stats[0], {name: stats[i + 1].detach() for i, name in enumerate(POLICY_STATS)}


# ---- value loss ----------------------------------------------------------------------------------

def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   response_mask: torch.Tensor, *, clip: float | None = 0.2, agg: str = "token-mean",
                   backend: str | None = None):
    """PPO's clipped value loss over response tokens (TRL / veRL ``compute_value_loss``).

    Per response token, values_clipped = clamp(values, old_values - clip, old_values + clip):
        loss_t = 0.5 * max((values - returns)^2, (values_clipped - returns)^2)
    (``clip=None``: 0.5 * (values - returns)^2), reduced by ``agg`` as in ``ppo_policy_loss``.

    Args:
        values: (B, T) the value head's current predictions, fp32 / bf16 / fp16 / fp64, any strides.
        old_values, returns: (B, T), the rollout's values and the GAE returns.
        response_mask: (B, T), nonzero = response token. clip: None or >= 0.
    Returns:
        (loss, clipfrac): 0-d fp32 tensors (fp64 for fp64 inputs); loss differentiable w.r.t.
        values only; clipfrac (detached) the fraction of response tokens where the clipped term is
        the larger. No response token: both 0.
    """
    _check_loss_inputs(("values", "old_values", "returns"), (values, old_values, returns), response_mask)
    if clip is not None:
        clip = check_number("clip", clip, low=0.0)
    agg_code = _check_agg(agg)
    chosen = _registry.select_backend("ppo_value_loss", values.device, backend)
    old_values, returns = detached(old_values), detached(returns)
    if chosen == "reference":
        return reference.ppo_value_loss(values, old_values, returns, response_mask, clip=clip, agg=agg)
    args = (*as_rows(values, old_values, returns), kernel_mask(response_mask), NO_CLIP if clip is None else clip, 0.0,
            0.0, agg_code)
    stats = _clipped_loss(VALUE, values, args, chosen)
    return stats[0], stats[1].detach()
