"""linear_token_logprobs: the LM head and per-token log-probs in one op, never the (..., V) logits.

``log p(target)`` (and the entropy) under softmax((hidden @ weight.T + bias) / T). The compiled
backends walk the vocabulary in blocks with an online log-sum-exp; the backward recomputes each
logits block from the saved per-row lse and accumulates the gradients of hidden, weight and bias in
fp32. Peak extra memory is one [token_chunk, vocab_block] fp32 block per thread (plus fp32 copies of
16-bit blocks of the inputs and an fp32 grad_hidden accumulator for 16-bit hidden), not tokens x V.

Wrapped as the torch.library custom op ``cai_kernels::linear_token_logprobs`` (fake implementation
+ autograd formula), so torch.compile traces models that call it without a graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _registry
from .._extension import cpu_kernels
from .._validation import (check_float_tensor, check_optional_int, check_positive_float, check_same_device,
                           check_shape, check_targets, check_targets_in_range)
from ..reference import logprobs as reference
from ._layout import rows_view

# (vocab_block, token_chunk) per backend. CPU: each worker thread holds one [token_chunk, vocab_block]
# fp32 logits block; 2048 x 1024 (8 MB) runs its single-threaded GEMMs at the rate of one big GEMM
# (SmolLM2's head, 576 x 49152). With many threads the chunk shrinks so that all the blocks together
# stay within CPU_SCRATCH_BYTES.
BLOCKING = {"cpu": (1024, 2048)}
CPU_SCRATCH_BYTES = 32 * 2**20


def _cpu_token_chunk(vocab_block: int, token_chunk: int) -> int:
    """token_chunk, capped so that one fp32 logits block per thread fits CPU_SCRATCH_BYTES in all."""
    per_thread = CPU_SCRATCH_BYTES // (4 * vocab_block * torch.get_num_threads())
    return min(token_chunk, max(64, per_thread))


def _blocking(backend: str) -> tuple[int, int]:
    if backend in BLOCKING:
        return BLOCKING[backend]
    from ..triton import linear_logprobs
    return linear_logprobs.VOCAB_BLOCK, linear_logprobs.TOKEN_CHUNK


def _kernels(backend: str):
    """The module or op namespace holding ``linear_token_logprobs_fwd`` / ``_bwd`` for a compiled backend."""
    if backend == "cpu":
        return cpu_kernels
    from ..triton import linear_logprobs
    return linear_logprobs


@torch.library.custom_op("cai_kernels::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: torch.Tensor, inv_temperature: float, ignore_index: int, has_ignore: bool,
                           with_entropy: bool, vocab_block: int, token_chunk: int, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        token_chunk = _cpu_token_chunk(vocab_block, token_chunk)
    else:  # the C++ kernel checks targets itself; Triton needs a host check
        check_targets_in_range("targets", targets, weight.size(0), ignore_index if has_ignore else None)
    return _kernels(backend).linear_token_logprobs_fwd(hidden, weight, bias, targets, inv_temperature, ignore_index,
                                                       has_ignore, with_entropy, vocab_block, token_chunk)


@_linear_token_logprobs.register_fake
def _(hidden, weight, bias, targets, inv_temperature, ignore_index, has_ignore, with_entropy, vocab_block,
      token_chunk, backend):
    rows, acc = targets.numel(), reference.accumulate_dtype(hidden.dtype)
    return (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows if with_entropy else 0, dtype=acc),
            hidden.new_empty(rows, dtype=acc))


@torch.library.custom_op("cai_kernels::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
                                    weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                                    lse: torch.Tensor, entropy: torch.Tensor, inv_temperature: float,
                                    ignore_index: int, has_ignore: bool, need_hidden: bool, need_weight: bool,
                                    need_bias: bool, vocab_block: int, token_chunk: int, backend: str
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        token_chunk = _cpu_token_chunk(vocab_block, token_chunk)
    return _kernels(backend).linear_token_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, targets, lse,
                                                       entropy, inv_temperature, ignore_index, has_ignore,
                                                       need_hidden, need_weight, need_bias, vocab_block,
                                                       token_chunk)


@_linear_token_logprobs_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, inv_temperature, ignore_index,
      has_ignore, need_hidden, need_weight, need_bias, vocab_block, token_chunk, backend):
    need_bias = need_bias and bias is not None
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temperature, ignore_index, has_ignore, with_entropy, vocab_block, \
        token_chunk, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.constants = (inv_temperature, ignore_index, has_ignore, with_entropy, vocab_block, token_chunk, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, has_ignore, with_entropy, vocab_block, token_chunk, backend = ctx.constants
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if with_entropy and grad_entropy is not None:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    else:  # an empty tensor tells the kernel to skip the entropy term
        grad_entropy = lse.new_empty(0)
    grad_hidden, grad_weight, grad_bias = _linear_token_logprobs_backward(
        grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, inv_temperature, ignore_index,
        has_ignore, need_hidden, need_weight, need_bias and bias is not None, vocab_block, token_chunk, backend)
    return ((grad_hidden if need_hidden else None, grad_weight if need_weight else None,
             grad_bias if need_bias and bias is not None else None) + (None,) * 8)


_linear_token_logprobs.register_autograd(_backward, setup_context=_setup_context)


def check_linear_operands(hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H), bias (V,) or None: one float dtype, matching sizes."""
    check_float_tensor("hidden", hidden, min_ndim=1)
    if hidden.size(-1) == 0:
        raise ValueError(f"hidden must have a non-empty last (hidden-size) dimension; got shape {tuple(hidden.shape)}")
    check_float_tensor("weight", weight, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype ({hidden.dtype}); got {weight.dtype}")
    if weight.size(1) != hidden.size(-1) or weight.size(0) == 0:
        raise ValueError(f"weight must have shape (V, H) with V >= 1 and H = hidden.shape[-1] = {hidden.size(-1)}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype ({hidden.dtype}); got {bias.dtype}")
        check_shape("bias", bias, (weight.size(0),), "one entry per row of weight")


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int | None = None, return_entropy: bool = False,
                          backend: str | None = None):
    """log p(target) under softmax((hidden @ weight.T + bias) / temperature), never forming the logits.

    Args:
        hidden: (..., H) fp32 / bf16 / fp16 (fp64 accepted, computed in fp64), any strides.
        weight: (V, H) the LM head, hidden's dtype, any strides. bias: (V,) or None, hidden's dtype.
        targets: (...) int64, ``hidden.shape[:-1]``, each in [0, V) or equal to ``ignore_index``.
        temperature: > 0; the logits are divided by it before the softmax.
        ignore_index: positions whose target equals it return 0 (and entropy 0) and get zero gradient.
        return_entropy: also return the entropy of the softmax per position.
        backend: "reference" | "cpu" | "triton" | None (auto: follows the device; env CAI_KERNELS_BACKEND).
    Returns:
        logprobs (...) fp32 (fp64 for fp64 inputs), and with ``return_entropy`` the entropy (...).
        Differentiable w.r.t. hidden, weight and bias; gradients in their dtypes, accumulated in fp32.
    Memory: the compiled backends keep one [token_chunk, vocab_block] fp32 logits block per CPU thread
    (at most 32 MB in all) or on the GPU, never (..., V); the "reference" backend materializes the logits.
    """
    check_linear_operands(hidden, weight, bias)
    check_targets("targets", targets, lead_shape=hidden.shape[:-1], what="one per row of hidden: hidden.shape[:-1]")
    check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    temperature = check_positive_float("temperature", temperature)
    ignore_index = check_optional_int("ignore_index", ignore_index)
    chosen = _registry.select_backend("linear_token_logprobs", hidden.device, backend)
    if chosen == "reference":
        if not torch.compiler.is_compiling():
            check_targets_in_range("targets", targets, weight.size(0), ignore_index)
        return reference.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                               ignore_index=ignore_index, return_entropy=return_entropy)
    vocab_block, token_chunk = _blocking(chosen)
    logp, entropy, _ = _linear_token_logprobs(rows_view(hidden), weight, bias, targets.reshape(-1).contiguous(),
                                              1.0 / temperature, 0 if ignore_index is None else ignore_index,
                                              ignore_index is not None, return_entropy, vocab_block, token_chunk,
                                              chosen)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp
