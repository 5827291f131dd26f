"""Triton kernels of linear_token_logprobs: the LM head and per-token log-probs, never the full logits.

Hybrid, block by block: the GEMMs are ``torch.mm`` on fp32 operands (cuBLAS on a GPU) into one
preallocated [token_chunk, vocab_block] scratch; the row-wise work on each logits block is Triton:
  lse_block_update_kernel   folds the block into each row's running (m, s, w) of the online
                            log-sum-exp (``_online_lse.py``, the recurrence of token_logprobs, state
                            kept in memory between blocks) and records the target's logit when it lies in
                            the block;
  logits_grad_block_kernel  turns the recomputed block in place into dL/dlogits from the saved lse
                            (and entropy): ([k == t] g - p_k (g + h (z_k - mu))) / T.
Vocabulary blocks are the outer loop, as in the C++ kernel (csrc/cpu/linear_token_logprobs.cpp):
each weight block is converted and read once per pass, and its gradient is finished (rounded once
to the weight's dtype) before the next block starts.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._params import LinearTokenLogprobsParams
from .._validation import accumulate_dtype, check_targets_in_range
from ._online_lse import block_v, grad_row_scalars, ignore_args, logits_grad, num_warps, online_lse_step

# Default blocking on a GPU: a 4096 x 4096 fp32 logits block is 64 MB, large enough for cuBLAS to
# run at full rate and ~1 % of a [65536, 262144] logits tensor.
VOCAB_BLOCK = 4096
TOKEN_CHUNK = 4096


@triton.jit
def lse_block_update_kernel(
    block_ptr, targets_ptr, max_ptr, sum_ptr, weighted_ptr, target_logit_ptr,
    row_start, vocab_start, block_width, stride_row,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # 64-bit: rows * width may exceed 2^31
    row = row_start + i
    target = tl.load(targets_ptr + row)
    active = target >= 0  # the launcher has checked the range; negatives here are ignore_index
    if HAS_IGNORE:
        active = target != ignore_index
    read_end = tl.where(active, block_width, 0)  # an ignored row reads nothing
    row_ptr = block_ptr + i * stride_row
    acc_dtype = max_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs

    m = tl.load(max_ptr + row)    # running max of z over the blocks so far
    s = tl.load(sum_ptr + row)    # sum exp(z - m)
    w = tl.zeros((), acc_dtype)   # sum exp(z - m) * (z - m)
    if WITH_ENTROPY:
        w = tl.load(weighted_ptr + row)
    for start in range(0, block_width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(acc_dtype) * inv_temperature
        m, s, w = online_lse_step(m, s, w, z, WITH_ENTROPY)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    if WITH_ENTROPY:
        tl.store(weighted_ptr + row, w)
    local = target - vocab_start
    here = active & (local >= 0) & (local < block_width)
    x_t = tl.load(row_ptr + tl.where(here, local, 0), mask=here, other=0.0)
    tl.store(target_logit_ptr + row, x_t.to(acc_dtype), mask=here)


@triton.jit
def logits_grad_block_kernel(
    block_ptr, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr, entropy_ptr,
    row_start, vocab_start, block_width, stride_row,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = row_start + i
    target, active, g, h, lse, mu = grad_row_scalars(row, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr,
                                                     entropy_ptr, ignore_index, HAS_IGNORE, WITH_ENTROPY)
    read_end = tl.where(active, block_width, 0)  # an ignored row reads nothing and writes zeros
    local_target = target - vocab_start
    row_ptr = block_ptr + i * stride_row
    for start in range(0, block_width, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf")).to(lse.dtype) * inv_temperature
        grad = logits_grad(z, cols == local_target, g, h, lse, mu, inv_temperature, WITH_ENTROPY)
        tl.store(row_ptr + cols, grad.to(block_ptr.dtype.element_ty), mask=cols < block_width)


class _Operands:
    """fp32 (fp64) views of the blocks the GEMMs read; converted copies only for 16-bit inputs."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.acc = accumulate_dtype(hidden.dtype)
        self.rows, self.hidden_size = hidden.size(0) * hidden.size(1), hidden.size(2)
        # (outer, inner, H) -> (rows, H): a view unless the rows are not one strided matrix
        self.hidden = hidden.reshape(self.rows, self.hidden_size)
        self.weight, self.bias = weight, bias
        self._chunk_key, self._chunk = None, None

    def hidden_chunk(self, r0: int, n: int) -> torch.Tensor:
        if (r0, n) != self._chunk_key:  # a single chunk (the common case) is converted once per pass
            self._chunk_key, self._chunk = (r0, n), self.hidden[r0:r0 + n].to(self.acc)
        return self._chunk

    def weight_block(self, v0: int, n: int) -> torch.Tensor:
        return self.weight[v0:v0 + n].to(self.acc)

    def bias_block(self, v0: int, n: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[v0:v0 + n].to(self.acc)


def _block_logits(out: torch.Tensor, hidden_chunk: torch.Tensor, weight_block: torch.Tensor,
                  bias_block: torch.Tensor | None) -> torch.Tensor:
    if bias_block is None:
        return torch.mm(hidden_chunk, weight_block.t(), out=out)
    return torch.addmm(bias_block, hidden_chunk, weight_block.t(), out=out)


def _blocks(size: int, step: int):
    for start in range(0, size, step):
        yield start, min(step, size - start)


def linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, params: LinearTokenLogprobsParams):
    """Same contract as the C++ kernel (csrc/cpu/linear_token_logprobs.cpp): hidden (outer, inner, H)
    with stride(2) == 1, weight (V, H), bias (V,) or None, targets (rows,) int64, each in [0, V) or
    ignore_index (else ValueError). Returns (logp, entropy, lse), each (rows,) fp32 (fp64 for fp64 inputs)."""
    check_targets_in_range("targets", targets, weight.size(0), params.ignore_index)
    ops = _Operands(hidden, weight, bias)
    rows, V, device = ops.rows, weight.size(0), hidden.device
    inv_temperature, with_entropy = 1.0 / params.temperature, params.with_entropy
    vocab_block, token_chunk = params.vocab_block, params.token_chunk
    ignore_index, has_ignore = ignore_args(params.ignore_index)
    running_max = torch.full((rows,), -math.inf, dtype=ops.acc, device=device)
    running_sum = torch.zeros(rows, dtype=ops.acc, device=device)
    weighted = torch.zeros(rows if with_entropy else 0, dtype=ops.acc, device=device)
    target_logit = torch.zeros(rows, dtype=ops.acc, device=device)
    if rows:
        chunk = min(token_chunk, rows)
        scratch = torch.empty(chunk * min(vocab_block, V), dtype=ops.acc, device=device)
        for v0, width in _blocks(V, vocab_block):
            weight_block, bias_block = ops.weight_block(v0, width), ops.bias_block(v0, width)
            block = block_v(width)
            for r0, n in _blocks(rows, chunk):
                logits = _block_logits(scratch[:n * width].view(n, width), ops.hidden_chunk(r0, n), weight_block,
                                       bias_block)
                lse_block_update_kernel[(n,)](
                    logits, targets, running_max, running_sum, weighted if with_entropy else running_sum,
                    target_logit, r0, v0, width, logits.stride(0), inv_temperature, ignore_index,
                    HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=num_warps(block),
                )
    active = targets != ignore_index if has_ignore else torch.ones_like(targets, dtype=torch.bool)
    lse = running_max + running_sum.log()
    logp = torch.where(active, target_logit * inv_temperature - lse, 0.0)
    entropy = (torch.where(active, running_sum.log() - weighted / running_sum, 0.0) if with_entropy
               else lse.new_empty(0))
    return logp, entropy, torch.where(active, lse, 0.0)


def linear_token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
                              weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                              lse: torch.Tensor, entropy: torch.Tensor, need_hidden: bool, need_weight: bool,
                              need_bias: bool, params: LinearTokenLogprobsParams):
    """Same contract as the C++ kernel: (grad_hidden (outer, inner, H), grad_weight (V, H), grad_bias (V,)) in
    the inputs' dtypes, an empty tensor for each one not asked for; the entropy term only with
    params.with_entropy."""
    # Ignored rows are never read: their dL/dlogits is 0, but 0 * NaN (or inf) held there -- in the hidden row
    # for grad_weight, in the weight for that row's grad_hidden -- would still be NaN (as the C++ kernel).
    ignored_rows = None
    if params.ignore_index is not None:
        ignored_rows = (targets == params.ignore_index).view(hidden.shape[:-1] + (1,))
        hidden = hidden.masked_fill(ignored_rows, 0.0)
    ops = _Operands(hidden, weight, bias)
    rows, H, V, acc = ops.rows, ops.hidden_size, weight.size(0), ops.acc
    need_bias = need_bias and bias is not None
    inv_temperature, with_entropy = 1.0 / params.temperature, params.with_entropy
    vocab_block, token_chunk = params.vocab_block, params.token_chunk
    ignore_index, has_ignore = ignore_args(params.ignore_index)
    hidden_acc = torch.zeros(rows, H, dtype=acc, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    if rows and (need_hidden or need_weight or need_bias):
        chunk = min(token_chunk, rows)
        scratch = torch.empty(chunk * min(vocab_block, V), dtype=acc, device=hidden.device)
        for v0, width in _blocks(V, vocab_block):
            weight_block, bias_block = ops.weight_block(v0, width), ops.bias_block(v0, width)
            # accumulators for this block: the output itself when it is fp32 (fp64), else fp32 rounded
            # once to the weight's dtype at the end of the block
            weight_grad = bias_grad = None
            if need_weight:
                weight_grad = (grad_weight[v0:v0 + width] if grad_weight.dtype == acc
                               else torch.zeros(width, H, dtype=acc, device=hidden.device))
            if need_bias:
                bias_grad = (grad_bias[v0:v0 + width] if grad_bias.dtype == acc
                             else torch.zeros(width, dtype=acc, device=hidden.device))
            block = block_v(width)
            for r0, n in _blocks(rows, chunk):
                hidden_chunk = ops.hidden_chunk(r0, n)
                logits = _block_logits(scratch[:n * width].view(n, width), hidden_chunk, weight_block, bias_block)
                logits_grad_block_kernel[(n,)](
                    logits, targets, grad_logp, grad_entropy if with_entropy else grad_logp, lse,
                    entropy if with_entropy else lse, r0, v0, width, logits.stride(0), inv_temperature,
                    ignore_index, HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block,
                    num_warps=num_warps(block),
                )
                if need_hidden:
                    hidden_acc[r0:r0 + n].addmm_(logits, weight_block)
                if need_weight:
                    weight_grad.addmm_(logits.t(), hidden_chunk)
                if need_bias:
                    bias_grad += logits.sum(0)
            if need_weight and grad_weight.dtype != acc:
                grad_weight[v0:v0 + width] = weight_grad
            if need_bias and grad_bias.dtype != acc:
                grad_bias[v0:v0 + width] = bias_grad
    grad_hidden = hidden_acc.to(hidden.dtype).view(hidden.shape) if need_hidden else None
    if grad_hidden is not None and ignored_rows is not None:
        grad_hidden.masked_fill_(ignored_rows, 0.0)
    # a gradient not asked for is a fresh empty tensor (outputs of a custom op must not alias each other)
    return tuple(hidden.new_empty(0) if g is None else g for g in (grad_hidden, grad_weight, grad_bias))


def _aot_specs():
    from ._aot import AotSpec

    common = {"inv_temperature": "fp32"}
    specs = []
    # The logits block is always fp32 (the GEMM's output), whatever the input dtype.
    for entropy in (False, True):
        flags = {"HAS_IGNORE": True, "WITH_ENTROPY": entropy, "BLOCK_V": 4096}
        label = f"fp32{'+entropy' if entropy else ''}"
        specs.append(AotSpec(
            "lse_block_update_kernel",
            {"block_ptr": "*fp32", "targets_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
             "weighted_ptr": "*fp32", "target_logit_ptr": "*fp32"} | common, flags,
            aligned=("block_ptr", "targets_ptr", "max_ptr", "sum_ptr", "weighted_ptr", "target_logit_ptr",
                     "block_width", "stride_row"),
            num_warps=num_warps(4096), label=label))
        specs.append(AotSpec(
            "logits_grad_block_kernel",
            {"block_ptr": "*fp32", "targets_ptr": "*i64", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
             "lse_ptr": "*fp32", "entropy_ptr": "*fp32"} | common, flags,
            aligned=("block_ptr", "targets_ptr", "grad_logp_ptr", "grad_entropy_ptr", "lse_ptr", "entropy_ptr",
                     "block_width", "stride_row"),
            num_warps=num_warps(4096), label=label))
    return specs


AOT_SPECS = _aot_specs()
