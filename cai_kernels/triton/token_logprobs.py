"""Triton kernels of token_logprobs: per-token log-probs and entropy, forward and backward.

One program per row of a (outer, inner, V) logits view (see ``cai_kernels/ops/_layout.py``); the
row is streamed in blocks of BLOCK_V with an online log-sum-exp (``_online_lse.py``), so nothing of
size V is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import TokenLogprobsParams
from .._validation import accumulate_dtype
from ._online_lse import block_v, grad_row_scalars, ignore_args, logits_grad, num_warps, online_lse_step


@triton.jit
def token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    inner, stride_outer, stride_inner, V,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows * V may exceed 2^31
    target = tl.load(targets_ptr + row)
    active = target == target  # every row, unless it is ignored
    if HAS_IGNORE:
        active = target != ignore_index
    # a target outside [0, V) (and not ignore_index) is bad data checked here, on the device: NaN, no read
    in_range = (target >= 0) & (target < V)
    read_end = tl.where(active, V, 0)  # an ignored row reads nothing
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    acc_dtype = lse_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits

    m = tl.full((), float("-inf"), acc_dtype)  # running max of z
    s = tl.zeros((), acc_dtype)                 # sum exp(z - m)
    w = tl.zeros((), acc_dtype)                 # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(acc_dtype) * inv_temperature
        m, s, w = online_lse_step(m, s, w, z, WITH_ENTROPY)

    readable = active & in_range
    safe_target = tl.where(readable, target, 0)
    z_target = tl.load(row_ptr + safe_target, mask=readable, other=0.0).to(acc_dtype) * inv_temperature
    lse = m + tl.log(s)
    logp = tl.where(in_range, z_target - lse, float("nan"))
    tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, tl.log(s) - w / s, 0.0))


@triton.jit
def token_logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_ptr,
    inner, stride_outer, stride_inner, V,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target, active, g, h, lse, mu = grad_row_scalars(row, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr,
                                                     entropy_ptr, ignore_index, HAS_IGNORE, WITH_ENTROPY)
    read_end = tl.where(active, V, 0)
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    grad_row_ptr = grad_ptr + row * V
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(lse.dtype) * inv_temperature
        grad = logits_grad(z, cols == target, g, h, lse, mu, inv_temperature, WITH_ENTROPY)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, params: TokenLogprobsParams):
    """Same contract as the C++ kernel (csrc/cpu/token_logprobs.cpp): logits (outer, inner, V) with
    stride(2) == 1, targets (rows,) int64, each in [0, V) or ignore_index: checked on the device, a NaN
    log-prob for a target outside (the C++ kernel raises ValueError; the ops layer checks CPU tensors).
    Returns (logp, entropy, lse), each (rows,) fp32 (fp64 for fp64 logits); entropy empty without
    params.with_entropy."""
    n_rows, V = targets.numel(), logits.size(2)
    acc = accumulate_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows if params.with_entropy else 0, dtype=acc, device=logits.device)
    if n_rows:
        block = block_v(V)
        ignore_index, has_ignore = ignore_args(params.ignore_index)
        token_logprobs_fwd_kernel[(n_rows,)](
            logits, targets, logp, entropy, lse,
            logits.size(1), logits.stride(0), logits.stride(1), V,
            1.0 / params.temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=params.with_entropy, BLOCK_V=block, num_warps=num_warps(block),
        )
    return logp, entropy, lse


def token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
                       targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                       params: TokenLogprobsParams) -> torch.Tensor:
    """Same contract as the C++ kernel: the (outer, inner, V) gradient, in the logits' dtype; the entropy
    term only with params.with_entropy."""
    n_rows, V = targets.numel(), logits.size(2)
    grad = torch.empty((logits.size(0), logits.size(1), V), dtype=logits.dtype, device=logits.device)
    with_entropy = params.with_entropy
    if n_rows:
        block = block_v(V)
        ignore_index, has_ignore = ignore_args(params.ignore_index)
        token_logprobs_bwd_kernel[(n_rows,)](
            grad_logp, grad_entropy if with_entropy else grad_logp, logits, targets, lse,
            entropy if with_entropy else lse, grad,
            logits.size(1), logits.stride(0), logits.stride(1), V,
            1.0 / params.temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=num_warps(block),
        )
    return grad


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    for dtype, entropy in (("bf16", True), ("fp32", False), ("fp16", False)):
        flags = {"HAS_IGNORE": True, "WITH_ENTROPY": entropy, "BLOCK_V": 4096}
        label = f"{dtype}{'+entropy' if entropy else ''}"
        specs.append(AotSpec(
            "token_logprobs_fwd_kernel",
            {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
             "lse_ptr": "*fp32", "inv_temperature": "fp32"}, flags,
            aligned=("logits_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "stride_outer",
                     "stride_inner", "V"),
            num_warps=num_warps(4096), label=label))
        specs.append(AotSpec(
            "token_logprobs_bwd_kernel",
            {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "logits_ptr": f"*{dtype}",
             "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_ptr": f"*{dtype}",
             "inv_temperature": "fp32"}, flags,
            aligned=("grad_logp_ptr", "grad_entropy_ptr", "logits_ptr", "targets_ptr", "lse_ptr", "entropy_ptr",
                     "grad_ptr", "stride_outer", "stride_inner", "V"),
            num_warps=num_warps(4096), label=label))
    return specs


AOT_SPECS = _aot_specs()
