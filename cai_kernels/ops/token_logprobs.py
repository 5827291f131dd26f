"""token_logprobs: log p(target) per position (and the entropy), fused, never an fp32 [rows, V] copy.

The compiled backends are wrapped as the torch.library custom op ``cai_kernels::token_logprobs``
(with a fake implementation and an autograd formula), so torch.compile traces models that call it
without a graph break; eager calls run the kernels directly (``_kernel_op.py``): one launch forward,
one backward. The backward recomputes p from the saved per-row log-sum-exp.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import TokenLogprobsParams
from .._validation import (accumulate_dtype, check_flag, check_float_tensor, check_optional_int, check_positive_float,
                           check_same_device, check_targets, check_targets_in_range, host_data_checks)
from ..reference.token_logprobs import token_logprobs as reference
from ._kernel_op import KernelOp, traced
from ._layout import flat, kernel_rows, rows_view, vmap_rows


def _vmap(in_dims, logits, targets, *, params, backend):
    """Rows are independent: the vmapped dimension is one more leading dimension."""
    (logits, targets), size = vmap_rows(in_dims, logits, targets)
    logp, entropy, lse = _forward(rows_view(logits), flat(targets), params=params, backend=backend)
    return (logp.view(size, -1), entropy.view(size, -1) if params.with_entropy else entropy.new_empty(size, 0),
            lse.view(size, -1)), (0, 0, 0)


_forward = KernelOp("token_logprobs", op="token_logprobs", kernel="token_logprobs_fwd",
                    args="Tensor logits, Tensor targets", params=TokenLogprobsParams,
                    returns="(Tensor, Tensor, Tensor)", vmap=_vmap)
_backward = KernelOp("token_logprobs_backward", op="token_logprobs", kernel="token_logprobs_bwd",
                     args="Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor targets, Tensor lse, "
                          "Tensor entropy", params=TokenLogprobsParams, returns="Tensor")


@_forward.register_fake
def _(logits, targets, params):
    rows, acc = targets.numel(), accumulate_dtype(logits.dtype)
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows if params.with_entropy else 0, dtype=acc),
            logits.new_empty(rows, dtype=acc))


@_backward.register_fake
def _(grad_logp, grad_entropy, logits, targets, lse, entropy, params):
    return logits.new_empty(logits.shape)


def upstream_grads(params, lse: torch.Tensor, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
    """(grad_logp, grad_entropy, params) as the backward kernels of token_logprobs / linear_token_logprobs take
    them: contiguous, in lse's dtype; without a gradient into the entropy, an empty grad_entropy and
    params.with_entropy cleared (the kernel skips that term)."""
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    elif grad_logp.dtype != lse.dtype or not grad_logp.is_contiguous():
        grad_logp = grad_logp.to(lse.dtype).contiguous()
    if params.with_entropy:
        if grad_entropy is not None:
            return grad_logp, grad_entropy.to(lse.dtype).contiguous(), params
        params = params._replace(with_entropy=False)
    return grad_logp, lse.new_empty(0), params


def _setup_context(ctx, args, params, backend, output):
    logits, targets = args
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.params, ctx.backend = params, backend


def _backward_formula(ctx, grad_logp, grad_entropy, _grad_lse):
    if grad_logp is None and grad_entropy is None:
        return None, None
    logits, targets, lse, entropy = ctx.saved_tensors
    grad_logp, grad_entropy, params = upstream_grads(ctx.params, lse, grad_logp, grad_entropy)
    grad_logits = _backward(grad_logp, grad_entropy, logits, targets, lse, entropy, params=params, backend=ctx.backend)
    return grad_logits, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int | None = None, return_entropy: bool = False, backend: str | None = None):
    """log p(target) under softmax(logits / temperature), per position, read from memory once.

    Args:
        logits: (..., V) fp32 / bf16 / fp16 (fp64 accepted, computed in fp64), any strides.
        targets: (...) int64, ``logits.shape[:-1]``, each in [0, V) or equal to ``ignore_index``: else a
            ValueError on CPU tensors (and in ``cai_kernels.debug()`` mode), NaN at that position on a GPU
            (checked on the device: no synchronization; nothing is read out of bounds).
        temperature: > 0; the logits are divided by it before the softmax.
        ignore_index: positions whose target equals it return 0 (and entropy 0) and get zero gradient.
        return_entropy: also return the entropy of softmax(logits / temperature) per position.
        backend: "reference" | "cpu" | "triton" | None (auto: follows the device; env CAI_KERNELS_BACKEND).
    Returns:
        logprobs (...) fp32 (fp64 for fp64 logits), and with ``return_entropy`` the entropy (...).
        Differentiable w.r.t. ``logits``; the gradient has the logits' dtype and is computed in fp32.
    Memory: O(rows) extra, never a float copy of the logits.
    """
    check_float_tensor("logits", logits, min_ndim=1)
    if logits.size(-1) == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension; got shape {tuple(logits.shape)}")
    check_targets("targets", targets, lead_shape=logits.shape[:-1], what="one per row of logits: logits.shape[:-1]")
    check_same_device(("logits", "targets"), logits, targets)
    temperature = check_positive_float("temperature", temperature)
    ignore_index = check_optional_int("ignore_index", ignore_index)
    return_entropy = check_flag("return_entropy", return_entropy)
    chosen = _registry.select_backend("token_logprobs", logits.device, backend)
    if chosen == "reference":
        if not traced() and logits.device.type != "meta":  # it indexes with the targets
            check_targets_in_range("targets", targets, logits.size(-1), ignore_index)
        return reference(logits, targets, temperature=temperature, ignore_index=ignore_index,
                         return_entropy=return_entropy)
    if chosen != "cpu" and host_data_checks(logits.device):  # the C++ kernels check as they read
        check_targets_in_range("targets", targets, logits.size(-1), ignore_index)
    params = TokenLogprobsParams(temperature, ignore_index, return_entropy)
    logp, entropy, _ = _forward(kernel_rows(logits, chosen), flat(targets), params=params, backend=chosen)
    if targets.dim() != 1:
        logp = logp.view(targets.shape)
        if return_entropy:
            entropy = entropy.view(targets.shape)
    return (logp, entropy) if return_entropy else logp
