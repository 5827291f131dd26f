"""The custom ops of the PPO clipped losses (ppo_policy_loss, ppo_value_loss), built the same way for both.

Forward ``cai_kernels::<op>``: (x, y, z, mask) -> (stats [loss, statistics...], row weights), x the input
the loss is differentiable in; backward ``cai_kernels::<op>_backward``: d loss / d x from the row weights
(loss = sum_b w_b sum_t loss_bt). One read of the inputs forward (per-row partial sums merged in row
order: deterministic), one read and one write backward.
"""

from __future__ import annotations

import torch

from .._validation import accumulate_dtype
from ._kernel_op import KernelOp, call_kernel_directly


def clipped_loss_op(op: str, params: type, inputs: tuple[str, str, str], n_stats: int) -> KernelOp:
    """The forward KernelOp of ``op`` (inputs: the names of x, y, z), its backward and fakes registered."""
    forward = KernelOp(op, op=op, kernel=f"{op}_fwd", args=", ".join(f"Tensor {name}" for name in inputs)
                       + ", Tensor mask", params=params, returns="(Tensor, Tensor)")
    backward = KernelOp(f"{op}_backward", op=op, kernel=f"{op}_bwd",
                        args=f"Tensor grad_loss, {', '.join(f'Tensor {name}' for name in inputs)}, Tensor mask, "
                             "Tensor row_weights", params=params, returns="Tensor")

    @forward.register_fake
    def _(x, y, z, mask, params):
        acc = accumulate_dtype(x.dtype)
        return x.new_empty(n_stats, dtype=acc), x.new_empty(x.size(0), dtype=acc)

    @backward.register_fake
    def _(grad_loss, x, y, z, mask, row_weights, params):
        return x.new_empty(x.shape)

    def setup_context(ctx, args, params, backend, output):
        ctx.save_for_backward(*args, output[1])
        ctx.params, ctx.backend = params, backend

    def backward_formula(ctx, grad_stats, _grad_weights):
        x, y, z, mask, row_weights = ctx.saved_tensors
        grad = backward(grad_stats[0].contiguous(), x, y, z, mask, row_weights, params=ctx.params,
                        backend=ctx.backend)
        return grad, None, None, None

    forward.register_autograd(backward_formula, setup_context=setup_context)
    return forward


def loss_stats(forward: KernelOp, differentiable: torch.Tensor, inputs: tuple, params, backend: str) -> torch.Tensor:
    """The stats vector [loss, ...] of one loss, straight from the kernel when no gradient is needed."""
    call = forward.run if call_kernel_directly(differentiable) else forward
    return call(*inputs, params=params, backend=backend)[0]
