"""pairwise_loss: the soft-label Bradley–Terry loss of a preference model, fused into one kernel per pass.

The compiled backends are wrapped as the torch.library custom op ``cai_kernels::pairwise_loss`` (fake
implementation + autograd formula) so torch.compile traces models that call it without a graph break.
The reduction happens inside the kernel (float64 partial sums, deterministic); the backward recomputes
d from the saved rewards instead of saving anything per pair.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._extension import cpu_kernels
from .._validation import check_float_tensor, check_same_device, check_shape
from ..reference import pairwise as reference
from ..reference.logprobs import accumulate_dtype
from ._preference_args import check_per_row_arg, check_probability_values, check_reduction, pack_per_row


def _kernels(backend: str):
    if backend == "cpu":
        return cpu_kernels
    from ..triton import pairwise
    return pairwise


@torch.library.custom_op("cai_kernels::pairwise_loss", mutates_args=())
def _pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, label_value: float,
                   margin: torch.Tensor, margin_value: float, reduction: int, backend: str) -> torch.Tensor:
    if backend != "cpu" and labels.numel():  # the C++ kernel checks the labels while it reads them
        check_probability_values("soft_labels", labels)
    return _kernels(backend).pairwise_loss_fwd(chosen, rejected, labels, label_value, margin, margin_value, reduction)


@_pairwise_loss.register_fake
def _(chosen, rejected, labels, label_value, margin, margin_value, reduction, backend):
    shape = (chosen.numel(),) if reduction == 0 else ()
    return chosen.new_empty(shape, dtype=accumulate_dtype(chosen.dtype))


@torch.library.custom_op("cai_kernels::pairwise_loss_backward", mutates_args=())
def _pairwise_loss_backward(grad: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor,
                            label_value: float, margin: torch.Tensor, margin_value: float, reduction: int,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels(backend).pairwise_loss_bwd(grad, chosen, rejected, labels, label_value, margin, margin_value,
                                               reduction)


@_pairwise_loss_backward.register_fake
def _(grad, chosen, rejected, labels, label_value, margin, margin_value, reduction, backend):
    return chosen.new_empty(chosen.shape), rejected.new_empty(rejected.shape)


def _setup_context(ctx, inputs, output):
    chosen, rejected, labels, label_value, margin, margin_value, reduction, backend = inputs
    ctx.save_for_backward(chosen, rejected, labels, margin)
    ctx.constants = (label_value, margin_value, reduction, backend)


def _backward(ctx, grad):
    chosen, rejected, labels, margin = ctx.saved_tensors
    label_value, margin_value, reduction, backend = ctx.constants
    grad = grad.to(accumulate_dtype(chosen.dtype)).contiguous()
    grad_chosen, grad_rejected = _pairwise_loss_backward(grad, chosen, rejected, labels, label_value, margin,
                                                         margin_value, reduction, backend)
    return grad_chosen, grad_rejected, None, None, None, None, None, None


_pairwise_loss.register_autograd(_backward, setup_context=_setup_context)


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
            every value in [0, 1] (else ValueError); None means 1 (hard labels). No gradient flows into it.
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
    check_same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    shape, device = chosen_rewards.shape, chosen_rewards.device
    soft_labels = check_per_row_arg("soft_labels", soft_labels, shape, device, probability=True)
    margin = check_per_row_arg("margin", margin, shape, device, probability=False)
    reduction_code = check_reduction(reduction)
    if reduction == "mean" and chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards must hold at least one pair for reduction='mean'; got shape "
                         f"{tuple(shape)} (use reduction='sum' or 'none' for empty batches)")
    selected = _registry.select_backend("pairwise_loss", device, backend)
    if selected == "reference":
        if isinstance(soft_labels, torch.Tensor) and not torch.compiler.is_compiling():
            check_probability_values("soft_labels", soft_labels.detach().expand(shape))
        return reference.pairwise_loss(chosen_rewards, rejected_rewards, soft_labels=soft_labels, margin=margin,
                                       reduction=reduction)
    acc = accumulate_dtype(chosen_rewards.dtype)
    labels, label_value = pack_per_row(soft_labels, 1.0, shape, acc, device)
    margins, margin_value = pack_per_row(margin, 0.0, shape, acc, device)
    loss = _pairwise_loss(chosen_rewards.reshape(-1).contiguous(), rejected_rewards.reshape(-1).contiguous(),
                          labels, label_value, margins, margin_value, reduction_code, selected)
    return loss.view(shape) if reduction == "none" else loss
