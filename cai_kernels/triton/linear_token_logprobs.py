"""Triton backend of linear_token_logprobs: the LM head and per-token log-probs, never the (tokens, V) logits.

Each call goes to one of two engines, by the inputs' dtype (``engine``, the routing table below):

  dtype                          engine        GEMMs on                          state
  bf16 / fp16                    linear_head   tensor cores (sm_90a HGMMA,       AOT-checked; GPU speed
                                               sm_80 HMMA), fp32 accumulators    not yet measured
  fp32, allow_tf32 True          linear_head   tensor cores in TF32              as above
  fp32, allow_tf32 False (exact) hybrid        cuBLAS fp32 (FMA units)           measured 2026-11-25
  fp64                           hybrid        cuBLAS fp64                       (rare: tests, gradcheck)

``linear_head`` (``cai_kernels/triton/linear_head.py``; ``choice_logprobs`` from hidden states reaches it
through this op) forms every logits tile on chip and drops it.
What a user gets from it (16-bit inputs, and fp32 under TF32):
  - precision: the logits are an fp32-accumulated GEMM of the operands as they are (bf16 / fp16
    products are exact in fp32: what cuBLAS returns with fp32 output), never bf16-rounded logits;
    softmax, log-sum-exp and entropy in fp32. TF32 (10-bit mantissa operands) only where
    ``torch.backends.cuda.matmul.allow_tf32`` is set, read at each call (forward and backward).
    Gradients: dz = dL/dlogits is rounded once to the operand dtype before the two gradient GEMMs
    (a tensor-core GEMM takes bf16 operands; autograd through bf16 logits rounds the same way), the
    GEMMs accumulate in fp32 and each gradient is rounded once to its dtype; grad_hidden's sum over
    vocabulary chunks is carried as a compensated bf16 pair (~16 mantissa bits).
    ``tests/_rounding_model.py`` bounds the error element by element.
  - memory: forward O(tokens) (per-piece softmax partials); backward a dz scratch of
    ``vocab_chunk`` columns in the operand dtype plus, for 16-bit inputs, the (tokens, H) low half of
    grad_hidden, together at most ``linear_head.MEMORY_FRACTION`` = 4.8 % of the bytes of the bf16
    (tokens, V) logits (a copy of hidden, made only when its rows are not one strided matrix, counts
    against the same budget). The issue asked for dz "in registers"; it is staged in bounded chunks
    instead, because grad W sums over tokens and grad X over the vocabulary: one owner per output tile
    (no atomics) needs dz of a chunk in memory, and that is what makes the backward deterministic.
  - determinism: bit-identical results run to run (no atomics; every sum has one owner and a fixed order).
  - launches: forward 2 (tiles x vocabulary pieces, then the merge), backward 2 per vocabulary chunk.
The hybrid (below in this file): ``torch.mm`` on the fp32 / fp64 operands into one preallocated
[token_chunk, vocab_block] block and Triton row kernels on it; deterministic (fixed-order cuBLAS
GEMMs), extra memory that block (64 MB fp32 at 4096 x 4096) plus an fp32 (tokens, H) grad_hidden.

Why exact fp32 and fp64 stay on the hybrid: it runs its GEMMs at cuBLAS's fp32 rate (H200, 2026-11-25:
44.1 ms fwd+bwd at [8192, 576]x[49152, 576], 4 GEMMs against 31.4 ms for the 3 bare GEMMs: within 5 %
of cuBLAS), while linear_head's exact fp32 ``tl.dot`` runs on FMA units from Triton's generic lowering
(64 x 64 tiles, no matrix instruction in its SASS) and its fp64 on DMMA 8x8x4 (mma.sync) at 64 x 64
tiles: neither has been timed. ``benchmarks/linear_head_gpu.py`` times both engines for exact fp32 and
fp64 and prints which one ``EXACT_ROUTES`` should name; change the table, not the code.

The hybrid's two row kernels, block by block:
  lse_block_update_kernel   folds the block into each row's running (m, s, w) of the online
                            log-sum-exp (``_online_lse.py``, the recurrence of token_logprobs, state
                            kept in memory between blocks) and records the target's logit when it lies in
                            the block;
  logits_grad_block_kernel  turns the recomputed block in place into dL/dlogits from the saved lse
                            (and entropy): ([k == t] g - p_k (g + h (z_k - mu))) / T.
Vocabulary blocks are the outer loop, as in the C++ kernel (csrc/cpu/linear_token_logprobs.cpp):
each weight block is read once per pass, and its gradient is finished before the next block starts.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._params import LinearTokenLogprobsParams
from . import linear_head
from ._online_lse import block_v, grad_row_scalars, ignore_args, logits_grad, num_warps, online_lse_step

LINEAR_HEAD = "linear_head"
HYBRID = "hybrid"
# The routing table of the inputs that the tensor cores cannot take as they are (exact fp32: TF32 not
# allowed; fp64). The GPU benchmark settles it (see the module docstring); tests force either entry.
EXACT_ROUTES = {torch.float32: HYBRID, torch.float64: HYBRID}
# linear_head's blocking; None: ``linear_head.default_config`` for the device and dtype (tests set it)
LINEAR_HEAD_CONFIG: linear_head.LinearHeadConfig | None = None

# The hybrid's default blocking on a GPU (the op passes it in the parameter bundle): a 4096 x 4096 fp32
# logits block is 64 MB, large enough for cuBLAS to run at full rate and ~1 % of a [65536, 262144]
# logits tensor.
VOCAB_BLOCK = 4096
TOKEN_CHUNK = 4096


def engine(dtype: torch.dtype, tf32: bool) -> str:
    """The engine that runs inputs of ``dtype``: LINEAR_HEAD or HYBRID (table in the module docstring).
    ``tf32``: fp32 GEMMs may run in TF32 (CUDA tensors and torch.backends.cuda.matmul.allow_tf32)."""
    if dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and tf32):
        return LINEAR_HEAD
    return EXACT_ROUTES[dtype]


def _engine_for(hidden: torch.Tensor) -> str:
    return engine(hidden.dtype, hidden.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, params: LinearTokenLogprobsParams):
    """Same contract as the C++ kernel (csrc/cpu/linear_token_logprobs.cpp): hidden (outer, inner, H)
    with stride(2) == 1, weight (V, H) any strides, bias (V,) or None, targets (rows,) int64, each in
    [0, V) or ignore_index (else NaN at that row: checked on the device). Returns (logp, entropy, lse), each (rows,) fp32 (fp64 for
    fp64 inputs); entropy is empty without params.with_entropy. params.vocab_block / token_chunk block
    the hybrid only (linear_head has its own blocking)."""
    if _engine_for(hidden) == LINEAR_HEAD:
        ignore_index, has_ignore = ignore_args(params.ignore_index)
        return linear_head.linear_token_logprobs_fwd(hidden, weight, bias, targets, 1.0 / params.temperature,
                                                     ignore_index, has_ignore, params.with_entropy,
                                                     config=LINEAR_HEAD_CONFIG)
    return _hybrid_fwd(hidden, weight, bias, targets, params)


def linear_token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
                              weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                              lse: torch.Tensor, entropy: torch.Tensor, need_hidden: bool, need_weight: bool,
                              need_bias: bool, params: LinearTokenLogprobsParams):
    """Same contract as the C++ kernel: (grad_hidden (outer, inner, H), grad_weight (V, H), grad_bias (V,)) in
    the inputs' dtypes, an empty tensor for each one not asked for; the entropy term only with
    params.with_entropy (grad_entropy is then (rows,), else empty)."""
    # Ignored rows are never read: their dL/dlogits is 0, but 0 * NaN (or inf) held there -- in the hidden row
    # for grad_weight, in the weight for that row's grad_hidden -- would still be NaN (as the C++ kernel).
    ignored_rows = None
    if params.ignore_index is not None:
        ignored_rows = (targets == params.ignore_index).view(hidden.shape[:-1] + (1,))
        hidden = hidden.masked_fill(ignored_rows, 0.0)
    if _engine_for(hidden) == LINEAR_HEAD:
        ignore_index, has_ignore = ignore_args(params.ignore_index)
        if not params.with_entropy:
            grad_entropy = grad_logp.new_empty(0)
        grads = linear_head.linear_token_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, targets, lse,
                                                      entropy, 1.0 / params.temperature, ignore_index, has_ignore,
                                                      need_hidden, need_weight, need_bias, config=LINEAR_HEAD_CONFIG)
    else:
        grads = _hybrid_bwd(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden,
                            need_weight, need_bias, params)
    if need_hidden and ignored_rows is not None:
        grads[0].masked_fill_(ignored_rows, 0.0)
    return grads


# -- the hybrid: exact fp32 / fp64 -------------------------------------------------------------------


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


def _rows(hidden: torch.Tensor) -> torch.Tensor:
    """(outer, inner, H) -> (rows, H): a view unless the rows are not one strided matrix."""
    return hidden.reshape(-1, hidden.size(-1))


def _block_logits(out: torch.Tensor, hidden_chunk: torch.Tensor, weight_block: torch.Tensor,
                  bias_block: torch.Tensor | None) -> torch.Tensor:
    if bias_block is None:
        return torch.mm(hidden_chunk, weight_block.t(), out=out)
    return torch.addmm(bias_block, hidden_chunk, weight_block.t(), out=out)


def _blocks(size: int, step: int):
    for start in range(0, size, step):
        yield start, min(step, size - start)


def _check_exact(hidden: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float32, torch.float64):  # 16-bit inputs always take the tensor cores
        raise TypeError(f"the hybrid engine takes fp32 / fp64 inputs; got {hidden.dtype}")


def _hybrid_fwd(hidden, weight, bias, targets, params: LinearTokenLogprobsParams):
    _check_exact(hidden)
    x = _rows(hidden)
    rows, V, device, acc = x.size(0), weight.size(0), hidden.device, hidden.dtype
    inv_temperature, with_entropy = 1.0 / params.temperature, params.with_entropy
    ignore_index, has_ignore = ignore_args(params.ignore_index)
    running_max = torch.full((rows,), -math.inf, dtype=acc, device=device)
    running_sum = torch.zeros(rows, dtype=acc, device=device)
    weighted = torch.zeros(rows if with_entropy else 0, dtype=acc, device=device)
    target_logit = torch.zeros(rows, dtype=acc, device=device)
    if rows:
        chunk = min(params.token_chunk, rows)
        scratch = torch.empty(chunk * min(params.vocab_block, V), dtype=acc, device=device)
        for v0, width in _blocks(V, params.vocab_block):
            weight_block = weight[v0:v0 + width]
            bias_block = None if bias is None else bias[v0:v0 + width]
            block = block_v(width)
            for r0, n in _blocks(rows, chunk):
                logits = _block_logits(scratch[:n * width].view(n, width), x[r0:r0 + n], weight_block, bias_block)
                lse_block_update_kernel[(n,)](
                    logits, targets, running_max, running_sum, weighted if with_entropy else running_sum,
                    target_logit, r0, v0, width, logits.stride(0), inv_temperature, ignore_index,
                    HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=num_warps(block),
                )
    active = targets != ignore_index if has_ignore else torch.ones_like(targets, dtype=torch.bool)
    lse = running_max + running_sum.log()
    in_range = (targets >= 0) & (targets < V)  # bad data: never read (the block kernel records in-block targets)
    logp = torch.where(active, torch.where(in_range, target_logit * inv_temperature - lse, math.nan), 0.0)
    entropy = (torch.where(active, running_sum.log() - weighted / running_sum, 0.0) if with_entropy
               else lse.new_empty(0))
    return logp, entropy, torch.where(active, lse, 0.0)


def _hybrid_bwd(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, need_hidden, need_weight,
                need_bias, params: LinearTokenLogprobsParams):
    _check_exact(hidden)
    x = _rows(hidden)
    rows, H, V, device = x.size(0), x.size(1), weight.size(0), hidden.device
    need_bias = need_bias and bias is not None
    inv_temperature, with_entropy = 1.0 / params.temperature, params.with_entropy
    ignore_index, has_ignore = ignore_args(params.ignore_index)
    # the gradients accumulate in their own (fp32 / fp64) storage, block by block in a fixed order
    grad_hidden = torch.zeros(rows, H, dtype=hidden.dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    if rows and (need_hidden or need_weight or need_bias):
        chunk = min(params.token_chunk, rows)
        scratch = torch.empty(chunk * min(params.vocab_block, V), dtype=hidden.dtype, device=device)
        for v0, width in _blocks(V, params.vocab_block):
            weight_block = weight[v0:v0 + width]
            bias_block = None if bias is None else bias[v0:v0 + width]
            block = block_v(width)
            for r0, n in _blocks(rows, chunk):
                hidden_chunk = x[r0:r0 + n]
                logits = _block_logits(scratch[:n * width].view(n, width), hidden_chunk, weight_block, bias_block)
                logits_grad_block_kernel[(n,)](
                    logits, targets, grad_logp, grad_entropy if with_entropy else grad_logp, lse,
                    entropy if with_entropy else lse, r0, v0, width, logits.stride(0), inv_temperature,
                    ignore_index, HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_V=block,
                    num_warps=num_warps(block),
                )
                if need_hidden:
                    grad_hidden[r0:r0 + n].addmm_(logits, weight_block)
                if need_weight:
                    grad_weight[v0:v0 + width].addmm_(logits.t(), hidden_chunk)
                if need_bias:
                    grad_bias[v0:v0 + width] += logits.sum(0)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    # a gradient not asked for is a fresh empty tensor (outputs of a custom op must not alias each other)
    return tuple(hidden.new_empty(0) if g is None else g for g in (grad_hidden, grad_weight, grad_bias))


def _aot_specs():
    from ._aot import AotSpec

    common = {"inv_temperature": "fp32"}
    specs = []
    # The hybrid runs exact fp32 inputs (fp64 too, not listed): its logits blocks are fp32.
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
