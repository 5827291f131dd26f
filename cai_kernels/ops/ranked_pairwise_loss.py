"""ranked_pairwise_loss: InstructGPT's loss over all pairs of K ranked responses, without a K x K matrix.

The custom op ``cai_kernels::ranked_pairwise_loss`` returns one loss per row (its pairs' mean); the
kernels loop over pairs in O(B K) memory, forward and backward. The reduction over rows: on the Triton
backend the custom op ``cai_kernels::ranked_pairwise_loss_reduced`` (the rows' kernel, then one program that
sums them: two launches forward, one backward, no host synchronization); on the others plain PyTorch on (B,)
values.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import REDUCTIONS, RankedPairwiseLossParams
from .._validation import (accumulate_dtype, check_float_tensor, check_num_valid, check_num_valid_values,
                           check_reduction, host_data_checks)
from ..reference.ranked_pairwise_loss import ranked_pairwise_loss as reference
from ._kernel_op import KernelOp, traced
from ._layout import no_tensor

# no parameter bundle: the op's only non-tensor argument, the reduction over rows, is plain PyTorch here
_forward = KernelOp("ranked_pairwise_loss", op="ranked_pairwise_loss", kernel="ranked_pairwise_loss_fwd",
                    args="Tensor rewards, Tensor num_valid", params=None, returns="Tensor")
_backward = KernelOp("ranked_pairwise_loss_backward", op="ranked_pairwise_loss", kernel="ranked_pairwise_loss_bwd",
                     args="Tensor grad_rows, Tensor rewards, Tensor num_valid", params=None, returns="Tensor")


@_forward.register_fake
def _(rewards, num_valid, params):
    return rewards.new_empty(rewards.size(0), dtype=accumulate_dtype(rewards.dtype))


@_backward.register_fake
def _(grad_rows, rewards, num_valid, params):
    return rewards.new_empty(rewards.shape)


def _setup_context(ctx, args, params, backend, output):
    ctx.save_for_backward(*args)
    ctx.backend = backend


def _backward_formula(ctx, grad_rows):
    if grad_rows is None:
        return None, None
    rewards, num_valid = ctx.saved_tensors
    grad_rows = grad_rows.to(accumulate_dtype(rewards.dtype)).contiguous()
    return _backward(grad_rows, rewards, num_valid, params=None, backend=ctx.backend), None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)

# the reduced loss in one custom op: Triton kernels only (the C++ kernels have no such entry: on CPU the
# PyTorch reduction of reduce_rows costs no launches)
_reduced = KernelOp("ranked_pairwise_loss_reduced", op="ranked_pairwise_loss", kernel="ranked_pairwise_loss_reduced_fwd",
                    args="Tensor rewards, Tensor num_valid", params=RankedPairwiseLossParams,
                    returns="(Tensor, Tensor)")
_reduced_backward = KernelOp("ranked_pairwise_loss_reduced_backward", op="ranked_pairwise_loss",
                             kernel="ranked_pairwise_loss_reduced_bwd",
                             args="Tensor grad_loss, Tensor rewards, Tensor num_valid, Tensor scale",
                             params=RankedPairwiseLossParams, returns="Tensor")


@_reduced.register_fake
def _(rewards, num_valid, params):
    acc = accumulate_dtype(rewards.dtype)
    return rewards.new_empty((), dtype=acc), rewards.new_empty(1, dtype=acc)


@_reduced_backward.register_fake
def _(grad_loss, rewards, num_valid, scale, params):
    return rewards.new_empty(rewards.shape)


def _reduced_setup_context(ctx, args, params, backend, output):
    _, scale = output
    ctx.save_for_backward(*args, scale)
    ctx.mark_non_differentiable(scale)
    ctx.params, ctx.backend = params, backend


def _reduced_backward_formula(ctx, grad_loss, _grad_scale):
    if grad_loss is None:
        return None, None
    rewards, num_valid, scale = ctx.saved_tensors
    if grad_loss.dtype != scale.dtype:
        grad_loss = grad_loss.to(scale.dtype)
    return _reduced_backward(grad_loss, rewards, num_valid, scale, params=ctx.params, backend=ctx.backend), None


_reduced.register_autograd(_reduced_backward_formula, setup_context=_reduced_setup_context)


def reduce_rows(row_loss: torch.Tensor, num_valid: torch.Tensor | None, K: int, reduction: str) -> torch.Tensor:
    """"mean" over the rows with at least one pair (0 if there is none), "sum", or "none"."""
    if reduction == "none":
        return row_loss
    # summed in float64, rounded once: row losses near the fp32 range (rewards of 1e38) overflow an fp32 sum
    total = row_loss.sum(dtype=torch.float64)
    if reduction == "sum":
        return total.to(row_loss.dtype)
    rows_with_pairs = (num_valid >= 2).sum().clamp_min(1) if num_valid is not None else max(
        row_loss.numel() if K >= 2 else 0, 1)
    return (total / rows_with_pairs).to(row_loss.dtype)


def ranked_loss_rows(rewards: torch.Tensor, num_valid: torch.Tensor | None, backend: str) -> torch.Tensor:
    """(B,) per-row losses (arguments already checked)."""
    return _forward(rewards.contiguous(), _counts(rewards, num_valid), params=None, backend=backend)


def _counts(rewards: torch.Tensor, num_valid: torch.Tensor | None) -> torch.Tensor:
    if num_valid is None:
        return no_tensor(rewards, torch.int64)
    return num_valid if num_valid.dtype == torch.int64 and num_valid.is_contiguous() else \
        num_valid.to(torch.int64).contiguous()


def ranked_loss(rewards: torch.Tensor, num_valid: torch.Tensor | None, reduction: str, backend: str) -> torch.Tensor:
    """The loss reduced by ``reduction`` (arguments already checked): in one custom op on Triton."""
    if backend == "triton" and reduction != "none":
        loss, _ = _reduced(rewards.contiguous(), _counts(rewards, num_valid),
                           params=RankedPairwiseLossParams(REDUCTIONS[reduction]), backend=backend)
        return loss
    return reduce_rows(ranked_loss_rows(rewards, num_valid, backend), num_valid, rewards.size(1), reduction)


def ranked_pairwise_loss(rewards: torch.Tensor, *, num_valid: torch.Tensor | None = None, reduction: str = "mean",
                         backend: str | None = None) -> torch.Tensor:
    """InstructGPT's ranking loss: each row holds K responses' rewards ranked best first; every pair (i ranked
    above j) contributes -logsigmoid(r_i - r_j), averaged over the row's K (K - 1) / 2 pairs.

    Args:
        rewards: (B, K) fp32 / bf16 / fp16 (fp64 accepted), row b ranked best first.
        num_valid: (B,) integers in [0, K] (else ValueError): row b's first n_b responses are real, the rest
            padding (ignored, zero gradient). None means all K.
        reduction: "mean" (over the rows that have at least one pair, so every prompt weighs the same
            whatever its number of responses; 0 if no row has a pair) | "sum" | "none" (the (B,) per-row
            losses, 0 for rows with fewer than two responses).
        backend: "reference" | "cpu" | "triton" | None (auto).
    Returns:
        fp32 (fp64 for fp64 rewards). Differentiable w.r.t. rewards.
    Memory: O(B K); the kernels loop over the pairs, never building the (B, K, K) matrix.
    """
    check_float_tensor("rewards", rewards, ndim=2)
    num_valid = check_num_valid(num_valid, rewards.size(0), rewards.device)
    check_reduction(reduction, REDUCTIONS)
    selected = _registry.select_backend("ranked_pairwise_loss", rewards.device, backend)
    if selected == "reference":
        if num_valid is not None and not traced() and rewards.device.type != "meta":
            check_num_valid_values(num_valid, rewards.size(1))
        return reference(rewards, num_valid=num_valid, reduction=reduction)
    if num_valid is not None and selected != "cpu" and host_data_checks(rewards.device):
        check_num_valid_values(num_valid, rewards.size(1))
    return ranked_loss(rewards, num_valid, reduction, selected)
