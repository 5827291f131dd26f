"""The custom ops of the PPO clipped losses (ppo_policy_loss, ppo_value_loss), built the same way for both.

Forward ``cai_kernels::<op>``: (x, y, z, mask) -> (loss 0-d, statistics, row weights), x the input the loss
is differentiable in (the statistics and weights are not differentiable); backward ``cai_kernels::<op>_backward``:
d loss / d x from the row weights (loss = sum_b w_b sum_t loss_bt). One read of the inputs forward (per-row
partial sums merged in row order: deterministic; on a GPU two launches), one read and one write backward (one
launch).
"""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype
from ._kernel_op import KernelOp


def clipped_loss_op(op: str, params: type, inputs: tuple[str, str, str], n_stats: int) -> KernelOp:
    """The forward KernelOp of ``op`` (inputs: the names of x, y, z), its backward and fakes registered."""
    forward = KernelOp(op, op=op, kernel=f"{op}_fwd", args=", ".join(f"Tensor {name}" for name in inputs)
                       + ", Tensor mask", params=params, returns="(Tensor, Tensor, Tensor)")
    backward = KernelOp(f"{op}_backward", op=op, kernel=f"{op}_bwd",
                        args=f"Tensor grad_loss, {', '.join(f'Tensor {name}' for name in inputs)}, Tensor mask, "
                             "Tensor row_weights", params=params, returns="Tensor")

    @forward.register_fake
    def _(x, y, z, mask, params):
        acc = accumulate_dtype(x.dtype)
        return x.new_empty((), dtype=acc), x.new_empty(n_stats - 1, dtype=acc), x.new_empty(x.size(0), dtype=acc)

    @backward.register_fake
    def _(grad_loss, x, y, z, mask, row_weights, params):
        return x.new_empty(x.shape)

    def setup_context(ctx, args, params, backend, output):
        _, stats, row_weights = output
        ctx.save_for_backward(*args, row_weights)
        ctx.mark_non_differentiable(stats, row_weights)
        ctx.params, ctx.backend = params, backend

    def backward_formula(ctx, grad_loss, _grad_stats, _grad_weights):
        if grad_loss is None:
            return None, None, None, None
        x, y, z, mask, row_weights = ctx.saved_tensors
        # the 0-d gradient is read by the kernel on the device (no host sync on a GPU)
        grad = backward(grad_loss, x, y, z, mask, row_weights, params=ctx.params, backend=ctx.backend)
        return grad, None, None, None

    forward.register_autograd(backward_formula, setup_context=setup_context)
    return forward


def loss_stats(forward: KernelOp, inputs: tuple, params, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, statistics) of one loss: the 0-d loss (differentiable) and the statistics (not)."""
    loss, stats, _ = forward(*inputs, params=params, backend=backend)
    return loss, stats
