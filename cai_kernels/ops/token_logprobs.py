"""token_logprobs: log p(target) per position (and the entropy), fused, never an fp32 [rows, V] copy.

The compiled backends are wrapped as the torch.library custom op ``cai_kernels::token_logprobs``
(with a fake implementation and an autograd formula), so torch.compile traces models that call it
without a graph break. The backward recomputes p from the saved per-row log-sum-exp.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._extension import cpu_kernels
from .._validation import (check_float_tensor, check_optional_int, check_positive_float, check_same_device,
                           check_targets, check_targets_in_range)
from ..reference import logprobs as reference
from ._layout import rows_view


def _kernels(backend: str):
    """The module or op namespace holding ``token_logprobs_fwd`` / ``_bwd`` for a compiled backend."""
    if backend == "cpu":
        return cpu_kernels
    from ..triton import logprobs
    return logprobs


@torch.library.custom_op("cai_kernels::token_logprobs", mutates_args=())
def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, ignore_index: int,
                    has_ignore: bool, with_entropy: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend != "cpu":  # the C++ kernel checks targets while it reads them; Triton needs a host check
        check_targets_in_range("targets", targets, logits.size(2), ignore_index if has_ignore else None)
    return _kernels(backend).token_logprobs_fwd(logits, targets, inv_temperature, ignore_index, has_ignore,
                                                with_entropy)


@_token_logprobs.register_fake
def _(logits, targets, inv_temperature, ignore_index, has_ignore, with_entropy, backend):
    rows, acc = targets.numel(), reference.accumulate_dtype(logits.dtype)
    return (logits.new_empty(rows, dtype=acc), logits.new_empty(rows if with_entropy else 0, dtype=acc),
            logits.new_empty(rows, dtype=acc))


@torch.library.custom_op("cai_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
                             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                             inv_temperature: float, ignore_index: int, has_ignore: bool,
                             backend: str) -> torch.Tensor:
    return _kernels(backend).token_logprobs_bwd(grad_logp, grad_entropy, logits, targets, lse, entropy,
                                                inv_temperature, ignore_index, has_ignore)


@_token_logprobs_backward.register_fake
def _(grad_logp, grad_entropy, logits, targets, lse, entropy, inv_temperature, ignore_index, has_ignore, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, inv_temperature, ignore_index, has_ignore, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.constants = (inv_temperature, ignore_index, has_ignore, with_entropy, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, has_ignore, with_entropy, backend = ctx.constants
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if with_entropy and grad_entropy is not None:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    else:  # an empty tensor tells the kernel to skip the entropy term
        grad_entropy = lse.new_empty(0)
    grad_logits = _token_logprobs_backward(grad_logp, grad_entropy, logits, targets, lse, entropy,
                                           inv_temperature, ignore_index, has_ignore, backend)
    return grad_logits, None, None, None, None, None, None


_token_logprobs.register_autograd(_backward, setup_context=_setup_context)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int | None = None, return_entropy: bool = False, backend: str | None = None):
    """log p(target) under softmax(logits / temperature), per position, read from memory once.

    Args:
        logits: (..., V) fp32 / bf16 / fp16 (fp64 accepted, computed in fp64), any strides.
        targets: (...) int64, ``logits.shape[:-1]``, each in [0, V) or equal to ``ignore_index``.
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
    check_same_device(logits=logits, targets=targets)
    temperature = check_positive_float("temperature", temperature)
    ignore_index = check_optional_int("ignore_index", ignore_index)
    chosen = _registry.select_backend("token_logprobs", logits.device, backend)
    if chosen == "reference":
        if not torch.compiler.is_compiling():
            check_targets_in_range("targets", targets, logits.size(-1), ignore_index)
        return reference.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    logp, entropy, _ = _token_logprobs(rows_view(logits), targets.reshape(-1).contiguous(), 1.0 / temperature,
                                       0 if ignore_index is None else ignore_index, ignore_index is not None,
                                       return_entropy, chosen)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp
