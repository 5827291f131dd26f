"""linear_token_logprobs: the LM head and per-token log-probs in one op, never the (..., V) logits.

``log p(target)`` (and the entropy) under softmax((hidden @ weight.T + bias) / T). The compiled
backends walk the vocabulary in blocks with an online log-sum-exp; the backward recomputes each
logits block from the saved per-row lse and accumulates the gradients of hidden, weight and bias in
fp32. On CPU (C++) peak extra memory is one [token_chunk, vocab_block] fp32 block per thread (plus fp32
copies of 16-bit blocks of the inputs), not tokens x V. On CUDA (Triton) bf16 / fp16 inputs, and fp32
under TF32, run on the tensor cores (``cai_kernels/triton/linear_head.py``: extra memory <= 4.8 % of
the bf16 logits for usual heads), exact fp32 and fp64 as the routing table in
``cai_kernels/triton/linear_token_logprobs.py`` says.

Wrapped as the torch.library custom op ``cai_kernels::linear_token_logprobs`` (fake implementation
+ autograd formula), so torch.compile traces models that call it without a graph break.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import LinearTokenLogprobsParams
from .._validation import (accumulate_dtype, check_flag, check_linear_operands, check_optional_int,
                           check_positive_float, check_same_device, check_targets, check_targets_in_range,
                           host_data_checks)
from ..reference.linear_token_logprobs import linear_token_logprobs as reference
from ._kernel_op import KernelOp, traced
from ._layout import flat, rows_view
from .token_logprobs import upstream_grads

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
    kernels = _registry.kernels("linear_token_logprobs", backend)
    return kernels.VOCAB_BLOCK, kernels.TOKEN_CHUNK


def _at_run(params: LinearTokenLogprobsParams, backend: str) -> LinearTokenLogprobsParams:
    """On CPU, the token chunk for the thread count of this call."""
    if backend != "cpu":
        return params
    return params._replace(token_chunk=_cpu_token_chunk(params.vocab_block, params.token_chunk))


_forward = KernelOp("linear_token_logprobs", op="linear_token_logprobs", kernel="linear_token_logprobs_fwd",
                    args="Tensor hidden, Tensor weight, Tensor? bias, Tensor targets",
                    params=LinearTokenLogprobsParams, returns="(Tensor, Tensor, Tensor)", at_run=_at_run)
_backward = KernelOp("linear_token_logprobs_backward", op="linear_token_logprobs", kernel="linear_token_logprobs_bwd",
                     args="Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
                          "Tensor targets, Tensor lse, Tensor entropy, bool need_hidden, bool need_weight, "
                          "bool need_bias",
                     params=LinearTokenLogprobsParams, returns="(Tensor, Tensor, Tensor)", at_run=_at_run)


@_forward.register_fake
def _(hidden, weight, bias, targets, params):
    rows, acc = targets.numel(), accumulate_dtype(hidden.dtype)
    return (hidden.new_empty(rows, dtype=acc), hidden.new_empty(rows if params.with_entropy else 0, dtype=acc),
            hidden.new_empty(rows, dtype=acc))


@_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden, need_weight, need_bias,
      params):
    need_bias = need_bias and bias is not None
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias else (0,)))


def _setup_context(ctx, args, params, backend, output):
    hidden, weight, bias, targets = args
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.params, ctx.backend = params, backend


def _backward_formula(ctx, grad_logp, grad_entropy, _grad_lse):
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    grad_logp, grad_entropy, params = upstream_grads(ctx.params, lse, grad_logp, grad_entropy)
    grad_hidden, grad_weight, grad_bias = _backward(grad_logp, grad_entropy, hidden, weight, bias, targets, lse,
                                                    entropy, need_hidden, need_weight, need_bias, params=params,
                                                    backend=ctx.backend)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None)


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int | None = None, return_entropy: bool = False,
                          backend: str | None = None):
    """log p(target) under softmax((hidden @ weight.T + bias) / temperature), never forming the logits.

    Args:
        hidden: (..., H) fp32 / bf16 / fp16 (fp64 accepted, computed in fp64), any strides.
        weight: (V, H) the LM head, hidden's dtype, any strides. bias: (V,) or None, hidden's dtype.
        targets: (...) int64, ``hidden.shape[:-1]``, each in [0, V) or equal to ``ignore_index``: else a
            ValueError on CPU tensors (and in ``cai_kernels.debug()`` mode), NaN at that position on a GPU.
        temperature: > 0; the logits are divided by it before the softmax.
        ignore_index: positions whose target equals it return 0 (and entropy 0) and get zero gradient.
        return_entropy: also return the entropy of the softmax per position.
        backend: "reference" | "cpu" | "triton" | None (auto: follows the device; env CAI_KERNELS_BACKEND).
    Returns:
        logprobs (...) fp32 (fp64 for fp64 inputs), and with ``return_entropy`` the entropy (...).
        Differentiable w.r.t. hidden, weight and bias; gradients in their dtypes, accumulated in fp32.
    Memory: never the (..., V) logits (the "reference" backend materializes them). CPU: one
    [token_chunk, vocab_block] fp32 logits block per thread, at most 32 MB in all. CUDA, bf16 / fp16 (and
    fp32 under TF32): a dz scratch of a few vocabulary columns per token plus the low half of
    grad_hidden, at most 4.8 % of a bf16 (..., V) logits tensor while H + 1024 <= 0.048 V; exact fp32 /
    fp64: one 4096 x 4096 logits block plus an fp32 (..., H) grad_hidden.
    Precision: the logits are an fp32-accumulated GEMM of the operands as given (bf16 products are
    exact in fp32), never 16-bit-rounded logits; TF32 only under torch.backends.cuda.matmul.allow_tf32.
    On CUDA, 16-bit gradients are GEMMs of dL/dlogits rounded once to the operand dtype (fp32 accumulation).
    Deterministic: every backend gives bit-identical results run to run.
    """
    check_linear_operands(hidden, weight, bias)
    check_targets("targets", targets, lead_shape=hidden.shape[:-1], what="one per row of hidden: hidden.shape[:-1]")
    check_same_device(("hidden", "weight", "bias", "targets"), hidden, weight, bias, targets)
    temperature = check_positive_float("temperature", temperature)
    ignore_index = check_optional_int("ignore_index", ignore_index)
    return_entropy = check_flag("return_entropy", return_entropy)
    chosen = _registry.select_backend("linear_token_logprobs", hidden.device, backend)
    if chosen == "reference":
        if not traced() and hidden.device.type != "meta":  # it indexes with the targets
            check_targets_in_range("targets", targets, weight.size(0), ignore_index)
        return reference(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
                         return_entropy=return_entropy)
    if chosen != "cpu" and host_data_checks(hidden.device):  # the C++ kernels check as they read
        check_targets_in_range("targets", targets, weight.size(0), ignore_index)
    params = LinearTokenLogprobsParams(temperature, ignore_index, return_entropy, *_blocking(chosen))
    logp, entropy, _ = _forward(rows_view(hidden), weight, bias, flat(targets), params=params, backend=chosen)
    if targets.dim() != 1:
        logp = logp.view(targets.shape)
        if return_entropy:
            entropy = entropy.view(targets.shape)
    return (logp, entropy) if return_entropy else logp
