"""pairwise_loss: the soft-label Bradley–Terry loss of a preference model, fused into one kernel per pass.

The compiled backends are wrapped as the torch.library custom op ``cai_kernels::pairwise_loss`` (fake
implementation + autograd formula) so torch.compile traces models that call it without a graph break.
The reduction happens inside the kernel (float64 partial sums, deterministic); the backward recomputes
d from the saved rewards instead of saving anything per pair.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import REDUCTIONS, PairwiseLossParams, Reduction
from .._validation import (accumulate_dtype, check_float_tensor, check_per_row_arg, check_probability_values,
                           check_reduction, check_same_device, check_shape, host_data_checks)
from ..reference.pairwise_loss import pairwise_loss as reference
from ._kernel_op import KernelOp, traced
from ._layout import flat, no_tensor, pack_per_row

_forward = KernelOp("pairwise_loss", op="pairwise_loss", kernel="pairwise_loss_fwd",
                    args="Tensor chosen, Tensor rejected, Tensor labels, Tensor margin", params=PairwiseLossParams,
                    returns="Tensor")
_backward = KernelOp("pairwise_loss_backward", op="pairwise_loss", kernel="pairwise_loss_bwd",
                     args="Tensor grad, Tensor chosen, Tensor rejected, Tensor labels, Tensor margin",
                     params=PairwiseLossParams, returns="(Tensor, Tensor)")


@_forward.register_fake
def _(chosen, rejected, labels, margin, params):
    shape = (chosen.numel(),) if params.reduction == Reduction.NONE else ()
    return chosen.new_empty(shape, dtype=accumulate_dtype(chosen.dtype))


@_backward.register_fake
def _(grad, chosen, rejected, labels, margin, params):
    return chosen.new_empty(chosen.shape), rejected.new_empty(rejected.shape)


def _setup_context(ctx, args, params, backend, output):
    ctx.save_for_backward(*args)
    ctx.params, ctx.backend = params, backend


def _backward_formula(ctx, grad):
    if grad is None:
        return None, None, None, None
    chosen, rejected, labels, margin = ctx.saved_tensors
    acc = accumulate_dtype(chosen.dtype)
    if grad.dtype != acc or not grad.is_contiguous():
        grad = grad.to(acc).contiguous()
    grad_chosen, grad_rejected = _backward(grad, chosen, rejected, labels, margin, params=ctx.params,
                                           backend=ctx.backend)
    return grad_chosen, grad_rejected, None, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def pair_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, soft_labels, margin, shape: torch.Size,
                reduction: Reduction, backend: str) -> torch.Tensor:
    """The loss of (N,) contiguous rewards, flattened from ``shape`` (arguments already checked; labels and margins
    broadcastable to ``shape``). Soft labels are checked to lie in [0, 1] on the host where
    ``host_data_checks`` says so (the C++ kernels check as they read); on a GPU a pair whose label is outside
    gives a NaN loss (the Triton kernels check on the device)."""
    acc = accumulate_dtype(chosen_rewards.dtype)
    empty = no_tensor(chosen_rewards, acc)  # "no per-pair tensor", for labels and margins alike
    labels, label_value = pack_per_row(soft_labels, 1.0, shape, acc, empty)
    margins, margin_value = pack_per_row(margin, 0.0, shape, acc, empty)
    if backend != "cpu" and labels.numel() and host_data_checks(labels.device):
        check_probability_values("soft_labels", labels)
    return _forward(chosen_rewards, rejected_rewards, labels, margins,
                    params=PairwiseLossParams(label_value, margin_value, reduction), backend=backend)


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                  soft_labels: torch.Tensor | float | None = None, margin: torch.Tensor | float | None = None,
                  reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """Soft-label Bradley–Terry loss of a preference model, per pair:

        d    = chosen_rewards - rejected_rewards - margin
        loss = -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d)),    p = soft_labels

    Args:
        chosen_rewards, rejected_rewards: (...) of one shape and dtype, fp32 / bf16 / fp16 (fp64 accepted,
            computed in fp64), any strides.
        soft_labels: P(chosen is preferred): a number or a float tensor broadcastable to the rewards' shape,
            every value in [0, 1]: else a ValueError (a number always; a tensor on CPU and in
            ``cai_kernels.debug()`` mode; on a GPU, checked on the device: NaN for that pair's loss).
            None means 1 (hard labels). No gradient flows into it.
        margin: a finite number or a float tensor broadcastable to the rewards' shape, subtracted from the
            reward difference (Llama-2's margin loss); None means 0. No gradient flows into it.
        reduction: "mean" (needs at least one pair) | "sum" | "none".
        backend: "reference" | "cpu" | "triton" | None (auto: follows the device; env CAI_KERNELS_BACKEND).
    Returns:
        fp32 (fp64 for fp64 rewards): a 0-d tensor, or the rewards' shape with reduction="none".
        Differentiable w.r.t. both reward tensors (gradients in their dtype, computed in fp32).
        Finite for any finite input: -logsigmoid(d) is evaluated as softplus(-d) = max(-d, 0) + log1p(e^-|d|),
        so |d| = 1e4 gives a loss of 1e4 on the wrong side and 0 on the right one, never inf or NaN.
    """
    check_float_tensor("chosen_rewards", chosen_rewards)
    check_float_tensor("rejected_rewards", rejected_rewards)
    if rejected_rewards.dtype != chosen_rewards.dtype:
        raise TypeError(f"rejected_rewards must have the dtype of chosen_rewards ({chosen_rewards.dtype}); "
                        f"got {rejected_rewards.dtype}")
    check_shape("rejected_rewards", rejected_rewards, chosen_rewards.shape, "the shape of chosen_rewards")
    check_same_device(("chosen_rewards", "rejected_rewards"), chosen_rewards, rejected_rewards)
    shape, device = chosen_rewards.shape, chosen_rewards.device
    soft_labels = check_per_row_arg("soft_labels", soft_labels, shape, device, probability=True)
    margin = check_per_row_arg("margin", margin, shape, device, probability=False)
    reduction_kind = check_reduction(reduction, REDUCTIONS)
    if reduction == "mean" and chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards must hold at least one pair for reduction='mean'; got shape "
                         f"{tuple(shape)} (use reduction='sum' or 'none' for empty batches)")
    selected = _registry.select_backend("pairwise_loss", device, backend)
    if selected == "reference":
        if isinstance(soft_labels, torch.Tensor) and not traced() and device.type != "meta":
            check_probability_values("soft_labels", soft_labels.detach().expand(shape))
        return reference(chosen_rewards, rejected_rewards, soft_labels=soft_labels, margin=margin,
                         reduction=reduction)
    loss = pair_losses(flat(chosen_rewards), flat(rejected_rewards), soft_labels, margin, shape, reduction_kind,
                       selected)
    return loss.view(shape) if reduction == "none" and len(shape) != 1 else loss
