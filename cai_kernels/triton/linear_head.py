"""Tensor-core Triton kernels for an LM head fused with per-token log-probs: logits tiles are formed,
used and dropped on chip, never written to memory as a (tokens, V) block.

Shared machinery of ``linear_token_logprobs`` and ``choice_logprobs`` from hidden states. With
X = hidden (N, H), W = weight (V, H), b = bias (V,), T the temperature and z = (X W^T + b) / T:
    lse_n     = log sum_k exp(z_nk)
    log p_n   = z_{n,t_n} - lse_n
    entropy_n = lse_n - sum_k p_nk z_nk                 (mu_n = lse_n - entropy_n = sum_k p_nk z_nk)
    dz_nk     = ([k == t_n] g_n - p_nk (g_n + h_n (z_nk - mu_n))) / T   (g = dL/dlog p, h = dL/dentropy)
    grad X = dz W,   grad W = dz^T X,   grad b = sum_n dz_n

Numerics. Every logits tile is ``tl.dot`` on the inputs' own dtype with fp32 accumulators: bf16 / fp16
products are exact in fp32, so the logits equal an fp32-accumulated GEMM of the 16-bit operands (what
cuBLAS returns with fp32 output), never bf16-rounded logits. fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` allows it, else exact fp32 (``input_precision="ieee"``); fp64
inputs run in fp64. The softmax works in base 2 (``exp2`` of logits pre-scaled by log2(e) / T: one
FMA per element folds the scale, the bias and the vocabulary edge). The target logit is a separate
fp32 dot of the target's weight row, in the merge kernel (no per-element select in the hot loop).

Forward (two launches):
  linear_head_fwd_kernel    grid (token tiles x vocabulary pieces), token-major so that programs
                            running together share X tiles and walk the same W tiles (L2 reuse). Each
                            program loops over its piece's vocabulary tiles: logits tile by tl.dot over
                            H, then the online (max m, sum s = sum 2^(z-m), entropy sum w = sum
                            2^(z-m) (z-m)) per row. It stores one partial (m, s, w) per (piece, row).
                            ``pieces`` is chosen so that about four waves of programs fill every SM
                            even when there are few token tiles.
  linear_head_merge_kernel  per block of rows: merges the pieces in piece order, adds the target
                            logit, writes log p, entropy and lse. Deterministic.
Backward (per vocabulary chunk of ``vocab_chunk`` columns, two launches):
  linear_head_dlogits_kernel  grid (token tiles x vocabulary tiles of the chunk), grouped for L2:
                            recomputes the logits tile, forms dz in registers from the saved lse and
                            entropy, stores it in the operand dtype into a [N, chunk] scratch, and the
                            fp32 column sums of its tile (grad b) into a [token tiles, chunk] buffer.
  linear_head_grad_kernel   one launch, two kinds of programs (long grad-W tiles first, so that the
                            short grad-X tiles fill the SMs around them):
                            grad W[chunk] = dz^T X: each [vocab tile, H tile] owned by one program
                              that reduces over *all* tokens in registers (fp32) and writes the
                              weight's dtype once: complete, never accumulated across launches;
                            grad X += dz W[chunk]: each [token tile, H tile] owned by one program; the
                              sum over chunks is carried in fp32 (fp32 / fp64 inputs: the output
                              itself) or, for 16-bit inputs, as a compensated pair hi + lo of the
                              input dtype (hi is the output, lo an N x H buffer): hi + lo holds ~16
                              mantissa bits, so chunk-to-chunk accumulation adds ~2^-17 relative
                              error, 100x below the final rounding of grad X to bf16.
                            grad b = sum of the per-tile column sums (torch.sum, fixed order).

Why this backward, and why it is deterministic. grad W sums over tokens and grad X over the
vocabulary; a program that owns a logits tile would need a [vocab tile, H] and a [token tile, H]
accumulator at once, which cannot stay on chip for H in the thousands. The alternatives: fp32
atomics into [V, H] and [N, H] (Cut Cross-Entropy's way: run-to-run different results, fp32 buffers
of V x H, and atomic traffic of ~4 H bytes per logit); recomputing the logits once per H slice (H /
slice times the forward work); or materializing dz in bounded chunks and reducing it with plain
GEMMs whose every output tile has one owner (Liger's way). This module takes the last: no atomics,
every sum in a fixed order, so the default path gives bit-identical results run to run (and
``torch.are_deterministic_algorithms_enabled()`` needs no other path). Costs, at H200 scale: one
recompute GEMM (4 GEMMs in all, against the 3 of an unfused head); the scratch written once and
read twice in the operand dtype; the grad-X accumulator read and written once per chunk.

Extra memory (beyond the inputs and the returned gradients). Forward: the (2 or 3, pieces, N) fp32
partials, O(N). Backward: the dz scratch (N x vocab_chunk, operand dtype) + lo (N x H, 16-bit inputs
when grad_hidden is asked for) + a copy of hidden when its rows are not one strided matrix (e.g.
``hidden.transpose(0, 1)``; the common ``hidden[:, :-1]`` is one strided matrix and is not copied) +
small per-tile buffers. ``vocab_chunk`` defaults to what keeps the total within ``MEMORY_FRACTION``
(4.8 %) of a bf16 (N, V) logits tensor, with a floor of 8 grad tiles (1024 columns at the H100 / H200
blocking): the bound holds while H + 1024 <= 0.048 V (lo alone is H / V of the bf16 logits; e.g.
[*, 576] x [49152]: chunk 1664, 4.6 %; [*, 4096] x [128256]: chunk 2048, 4.8 %). Heads with a small
vocabulary for their width exceed it: [*, 4096] x [32000] (Llama 2) takes 1024 columns + lo, 16 %.
dz is rounded to the operand dtype before the two GEMMs, as every tensor-core path must (and as
autograd through bf16 logits does); for fp16 inputs probabilities below 6e-5 land in fp16's
subnormal range (absolute step 6e-8), as in torch's own fp16 softmax backward.

Integration: the Triton backend of the op ``linear_token_logprobs`` (``triton/linear_token_logprobs.py``)
calls ``linear_token_logprobs_fwd`` / ``_bwd`` below for bf16 / fp16 inputs and for fp32 under TF32; its
routing table (``EXACT_ROUTES`` there) says which engine runs exact fp32 and fp64, which this module
can run too (exact fp32 ``tl.dot`` on FMA units; fp64 on DMMA with fp64 accumulators). The blocking is
this module's (``default_config``, or ``config=``). ``choice_logprobs`` from hidden states reaches it
through that op; with few tokens (one token tile) ``pieces`` spreads the vocabulary over every SM.

Layouts: hidden any (..., H) view (reshaped to (N, H) rows; a copy only when the rows are not one
strided matrix), weight (V, H) any strides (unit inner strides are what the JIT specializes and the
tensor cores read at full width). All offsets of rows, vocabulary entries and the scratch are 64-bit.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .._validation import accumulate_dtype
from ._launch import cdiv  # not triton.cdiv on the host: its constexpr wrapper costs ~2 us a call
from ._online_lse import targets_of_rows

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies (Triton reads globals only as constexpr)
_LN2 = tl.constexpr(LN2)
# Extra memory the backward may use (scratch + lo + per-tile buffers), as a fraction of the bytes of
# a bf16 (N, V) logits tensor; the acceptance bound of the project is 5 %.
MEMORY_FRACTION = 0.048
WAVES = 4  # forward programs per SM the automatic `pieces` aims for


@dataclass(frozen=True)
class Blocks:
    """One kernel's tile shape and launch options (tl.dot: BLOCK_M/N/K >= 16, powers of 2)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class LinearHeadConfig:
    """Blocking of the four kernels. ``pieces`` (forward vocabulary pieces per token tile) and
    ``vocab_chunk`` (backward scratch width) are chosen per call when None."""

    fwd: Blocks
    dlogits: Blocks
    grad: Blocks
    pieces: int | None = None
    vocab_chunk: int | None = None
    group_m: int = 8               # dlogits kernel: token tiles per L2 group
    merge_rows: int = 64           # merge kernel: rows per program
    merge_cols: int = 128          # merge kernel: hidden columns per step of the target dot
    memory_fraction: float = MEMORY_FRACTION


# Hopper (H100 / H200, sm_90a): 128 x 128 x 64 tiles of 8 warps (two warpgroups on wgmma); Ampere-class
# (sm_80, mma.sync): BLOCK_K 32, which keeps three stages within its shared memory. The GPU benchmark's sweep (benchmarks/linear_head_gpu.py)
# is where these get revised; the AOT check compiles exactly these.
HOPPER = LinearHeadConfig(fwd=Blocks(128, 128, 64, num_warps=8, num_stages=3),
                          dlogits=Blocks(128, 128, 64, num_warps=8, num_stages=3),
                          grad=Blocks(128, 128, 64, num_warps=8, num_stages=3))
AMPERE = LinearHeadConfig(fwd=Blocks(128, 128, 32, num_warps=8, num_stages=3),
                          dlogits=Blocks(128, 128, 32, num_warps=8, num_stages=3),
                          grad=Blocks(128, 128, 32, num_warps=8, num_stages=3))
# Exact fp32 (TF32 not allowed) runs tl.dot on FMA units: smaller tiles (128 x 128 spills on sm_90a).
EXACT_FP32 = LinearHeadConfig(fwd=Blocks(64, 64, 32, num_warps=4, num_stages=3),
                              dlogits=Blocks(64, 64, 32, num_warps=4, num_stages=3),
                              grad=Blocks(64, 64, 32, num_warps=4, num_stages=3))
# fp64 (DMMA / FMA): 128 x 128 fp64 accumulators spill; 64 x 64 x 16 does not (sm_80, sm_90a).
FP64 = LinearHeadConfig(fwd=Blocks(64, 64, 16, num_warps=4, num_stages=2),
                        dlogits=Blocks(64, 64, 16, num_warps=4, num_stages=2),
                        grad=Blocks(64, 64, 16, num_warps=4, num_stages=2))
# Triton's interpreter (CPU tensors): small tiles so that tests hit every tile edge on small inputs.
INTERPRETER = LinearHeadConfig(fwd=Blocks(16, 32, 16), dlogits=Blocks(16, 32, 16), grad=Blocks(16, 32, 16),
                               pieces=3, vocab_chunk=64, group_m=2, merge_rows=16, merge_cols=32)


def default_config(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                   allow_tf32: bool = True) -> LinearHeadConfig:
    """The blocking for a device and input dtype: the interpreter's on CPU tensors; on a GPU by compute
    capability for the tensor-core paths, smaller tiles for exact fp32 (allow_tf32 False) and fp64."""
    if device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float64:
        return FP64
    if dtype == torch.float32 and not allow_tf32:
        return EXACT_FP32
    major, _ = torch.cuda.get_device_capability(device)
    return HOPPER if major == 9 else AMPERE


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# -- shared device functions ---------------------------------------------------------------------


@triton.jit
def _scalar(hi, lo, dtype: tl.constexpr):
    """A Python float passed as two fp32 halves (Triton passes float arguments as fp32): exact
    enough for fp64 inputs, just ``hi`` in fp32."""
    return tl.cast(hi, dtype) + tl.cast(lo, dtype)


@triton.jit
def _x_rows(rows, N, inner, stride_xo, stride_xn, SPLIT_ROWS: tl.constexpr):
    """64-bit offsets of hidden's rows (clamped to N - 1: rows past N read row N - 1, in bounds): row r
    at r * stride_xn, or, with SPLIT_ROWS, at (r // inner) * stride_xo + (r % inner) * stride_xn (rows
    of an (outer, inner, H) view that are not one strided matrix, e.g. ``hidden[:, :-1]``)."""
    r = tl.minimum(rows, N - 1).to(tl.int64)
    if SPLIT_ROWS:
        return (r // inner) * stride_xo + (r % inner) * stride_xn
    return r * stride_xn


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on the tensor cores. UPCAST only under Triton's interpreter, which multiplies the
    raw bits of bf16 operands (seen with triton 3.9): fp32 products of the same values are exact."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # out_dtype: triton 3.6 asserts it equals the accumulator's dtype (fp32 by default; fp64 here for fp64)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _logits_tile(x_ptr, w_ptr, row_offsets, col_offsets, H, stride_xh, stride_wh,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """X[rows] @ W[cols]^T as a [BLOCK_M, BLOCK_N] ACC tile; row_offsets / col_offsets are the 64-bit
    offsets of the (in-bounds, clamped) rows of X and W."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row_offsets[:, None] + ks[None, :] * stride_xh
    w_ptrs = w_ptr + col_offsets[None, :] + ks[:, None] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = ks < H - k * BLOCK_K
            x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        acc = _mma(x, w, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xh
        w_ptrs += BLOCK_K * stride_wh
    return acc


@triton.jit
def _scaled_logits(acc, b_ptr, cols, valid, scale, HAS_BIAS: tl.constexpr):
    """z = (acc + b) * scale, -inf in the columns that are not `valid` (past the vocabulary or the
    chunk): one FMA per element."""
    shift = tl.where(valid, 0.0, float("-inf")).to(acc.dtype)
    if HAS_BIAS:
        shift += tl.load(b_ptr + cols, mask=valid, other=0.0).to(acc.dtype) * scale
    return acc * scale + shift[None, :]


@triton.jit
def _online_update(m, s, w, z, WITH_ENTROPY: tl.constexpr):
    """Folds a [rows, cols] tile of base-2 logits z into the per-row running max m, s = sum 2^(z-m)
    and w = sum 2^(z-m) (z-m); rows that saw only -inf keep m = -inf, s = w = 0."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid -inf - -inf
    alpha = tl.exp2(m - m_ref)
    d = z - m_ref[:, None]
    e = tl.exp2(d)
    if WITH_ENTROPY:
        # rebase w to m_new: sum e' (z - m') = alpha (w + s (m - m')); e = 0 at z = -inf adds 0, not NaN
        w = tl.where(s > 0, alpha * (w + s * (m - m_ref)), 0.0)
        w += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, w


# -- forward ------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["pieces"])
def linear_head_fwd_kernel(
    x_ptr, w_ptr, b_ptr, part_ptr,
    N, V, H, inner, stride_xo, stride_xn, stride_xh, stride_wv, stride_wh,
    pieces, scale_hi, scale_lo,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial softmax statistics of one (token tile, vocabulary piece).

    x (N, H), w (V, H), b (V,) [HAS_BIAS]; scale = log2(e) / T (hi + lo). part: (3, pieces, N) in the
    accumulator dtype: m, s, w of ``_online_update`` for this piece's columns (w only WITH_ENTROPY).
    Piece p covers vocabulary tiles [p * tiles // pieces, (p + 1) * tiles // pieces).
    """
    pid = tl.program_id(0)
    tile_m = pid // pieces
    piece = pid % pieces
    vocab_tiles = tl.cdiv(V, BLOCK_N)
    tile_begin = (piece * vocab_tiles) // pieces
    tile_end = ((piece + 1) * vocab_tiles) // pieces
    ACC = part_ptr.dtype.element_ty
    scale = _scalar(scale_hi, scale_lo, ACC)

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # rows past N read row N - 1 (in bounds, no mask in the loop); their results are not stored
    row_offsets = _x_rows(rows, N, inner, stride_xo, stride_xn, SPLIT_ROWS)
    m = tl.full((BLOCK_M,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_M,), ACC)
    w = tl.zeros((BLOCK_M,), ACC)
    for tile in range(tile_begin, tile_end):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_offsets = tl.minimum(cols, V - 1).to(tl.int64) * stride_wv
        acc = _logits_tile(x_ptr, w_ptr, row_offsets, col_offsets, H, stride_xh, stride_wh,
                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ACC, DOT_PRECISION, UPCAST)
        z = _scaled_logits(acc, b_ptr, cols, cols < V, scale, HAS_BIAS)
        m, s, w = _online_update(m, s, w, z, WITH_ENTROPY)

    out = part_ptr + piece.to(tl.int64) * N + rows
    plane = pieces.to(tl.int64) * N
    in_rows = rows < N
    tl.store(out, m, mask=in_rows)
    tl.store(out + plane, s, mask=in_rows)
    if WITH_ENTROPY:
        tl.store(out + 2 * plane, w, mask=in_rows)


@triton.jit(do_not_specialize=["pieces"])
def linear_head_merge_kernel(
    part_ptr, x_ptr, w_ptr, b_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    N, H, V, inner, stride_xo, stride_xn, stride_xh, stride_wv, stride_wh,
    pieces, scale_hi, scale_lo, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT_ROWS: tl.constexpr,
):
    """Per row: merge the pieces' (m, s, w) in piece order, then log p = z_t - lse, entropy, lse.

    z_t = (x . w_t + b_t) / T as an fp32 (fp64) dot; scale = log2(e) / T as in the forward kernel. targets (N,) int64;
    ignored rows (target == ignore_index, HAS_IGNORE) read nothing and get 0 everywhere; a target outside
    [0, V) otherwise (bad data, checked here on the device) reads nothing and gets a NaN log-prob.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows, target, active, in_range = targets_of_rows(targets_ptr, rows, N, V, ignore_index, HAS_IGNORE)
    ACC = part_ptr.dtype.element_ty
    inv_temperature = _scalar(scale_hi, scale_lo, ACC) * _LN2

    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_R,), ACC)
    w = tl.zeros((BLOCK_R,), ACC)
    plane = pieces.to(tl.int64) * N
    at = part_ptr + rows
    for _ in range(0, pieces):
        m_p = tl.load(at, mask=in_rows, other=float("-inf"))
        s_p = tl.load(at + plane, mask=in_rows, other=0.0)
        m_new = tl.maximum(m, m_p)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        alpha_p = tl.exp2(m_p - m_ref)
        if WITH_ENTROPY:
            w_p = tl.load(at + 2 * plane, mask=in_rows, other=0.0)
            w = (tl.where(s > 0, alpha * (w + s * (m - m_ref)), 0.0)
                 + tl.where(s_p > 0, alpha_p * (w_p + s_p * (m_p - m_ref)), 0.0))
        s = s * alpha + s_p * alpha_p
        m = m_new
        at += N  # the next piece's row (64-bit pointer steps: pieces * N may pass 2^31)

    readable = active & in_range
    safe_target = tl.where(readable, target, 0)
    x_rows = x_ptr + _x_rows(rows, N, inner, stride_xo, stride_xn, SPLIT_ROWS)
    w_rows = w_ptr + safe_target * stride_wv
    dot = tl.zeros((BLOCK_R, BLOCK_H), ACC)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        mask = readable[:, None] & (ks < H)[None, :]
        xv = tl.load(x_rows[:, None] + ks[None, :] * stride_xh, mask=mask, other=0.0)
        wv = tl.load(w_rows[:, None] + ks[None, :] * stride_wh, mask=mask, other=0.0)
        dot += xv.to(ACC) * wv.to(ACC)
    target_logit = tl.sum(dot, axis=1)
    if HAS_BIAS:
        target_logit += tl.load(b_ptr + safe_target, mask=readable, other=0.0).to(ACC)

    log2_s = tl.log2(s)
    lse = (m + log2_s) * _LN2
    logp = tl.where(in_range, target_logit * inv_temperature - lse, float("nan"))
    tl.store(logp_ptr + rows, tl.where(active, logp, 0.0), mask=in_rows)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_rows)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(active, (log2_s - w / s) * _LN2, 0.0), mask=in_rows)


# -- backward -----------------------------------------------------------------------------------------


@triton.jit
def linear_head_dlogits_kernel(
    x_ptr, w_ptr, b_ptr, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr, entropy_ptr,
    d_ptr, bias_part_ptr,
    N, V, H, vocab_start, width, inner, stride_xo, stride_xn, stride_xh, stride_wv, stride_wh, stride_d,
    stride_bias_part, scale_hi, scale_lo, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, NEED_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dz of one [token tile, vocabulary tile] of the chunk [vocab_start, vocab_start + width).

    d: (N, >= width) scratch in the operand dtype, d[n, j] = dz[n, vocab_start + j]. bias_part:
    (token tiles, >= width) fp32 (fp64) column sums of dz over this tile's rows [NEED_BIAS].
    lse, entropy: the forward's (N,) outputs; grad_logp, grad_entropy (N,) [WITH_ENTROPY].
    """
    pid = tl.program_id(0)
    # grouped order: GROUP_M token tiles sweep the chunk's vocabulary tiles together (L2 reuse)
    token_tiles = tl.cdiv(N, BLOCK_M)
    vocab_tiles = tl.cdiv(width, BLOCK_N)
    group = pid // (GROUP_M * vocab_tiles)
    first_m = group * GROUP_M
    group_size = tl.minimum(token_tiles - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * vocab_tiles)) % group_size
    tile_n = (pid % (GROUP_M * vocab_tiles)) // group_size
    ACC = lse_ptr.dtype.element_ty
    scale = _scalar(scale_hi, scale_lo, ACC)  # log2(e) / T
    inv_temperature = scale * _LN2

    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    target = tl.load(targets_ptr + rows, mask=in_rows, other=-1)
    active = in_rows
    if HAS_IGNORE:
        active = in_rows & (target != ignore_index)
    # per-row factors with 1/T and the base-2 units folded in: dz = [k == t] g' - p (g' + h' (z2 - mu2))
    g = tl.where(active, tl.load(grad_logp_ptr + rows, mask=in_rows, other=0.0), 0.0) * inv_temperature
    lse = tl.load(lse_ptr + rows, mask=in_rows, other=0.0)
    lse2 = tl.where(active, lse * _LOG2E, float("inf"))  # p = 0 on rows that get no gradient
    if WITH_ENTROPY:
        h = tl.where(active, tl.load(grad_entropy_ptr + rows, mask=in_rows, other=0.0), 0.0)
        h = h * (inv_temperature * _LN2)
        mu2 = (lse - tl.load(entropy_ptr + rows, mask=in_rows, other=0.0)) * _LOG2E

    local_cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vocab_start + local_cols
    in_chunk = local_cols < width
    acc = _logits_tile(x_ptr, w_ptr, _x_rows(rows, N, inner, stride_xo, stride_xn, SPLIT_ROWS),
                       tl.minimum(cols, V - 1).to(tl.int64) * stride_wv, H, stride_xh, stride_wh,
                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ACC, DOT_PRECISION, UPCAST)
    z = _scaled_logits(acc, b_ptr, cols, in_chunk, scale, HAS_BIAS)  # the chunk ends at or before V
    p = tl.exp2(z - lse2[:, None])
    coef = g[:, None]
    if WITH_ENTROPY:
        coef = g[:, None] + h[:, None] * tl.where(p > 0, z - mu2[:, None], 0.0)
    dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - p * coef
    dz = tl.where(active[:, None], dz, 0.0)  # also zero where z is NaN or +inf on an ignored row

    d_ptrs = d_ptr + rows[:, None] * stride_d + local_cols[None, :]
    tl.store(d_ptrs, dz.to(d_ptr.dtype.element_ty), mask=in_rows[:, None] & in_chunk[None, :])
    if NEED_BIAS:
        tl.store(bias_part_ptr + tile_m.to(tl.int64) * stride_bias_part + local_cols, tl.sum(dz, axis=0),
                 mask=in_chunk)


@triton.jit(do_not_specialize=["weight_tiles"])
def linear_head_grad_kernel(
    d_ptr, x_ptr, w_ptr, gw_ptr, gx_ptr, gx_lo_ptr,
    N, H, vocab_start, width, stride_d, inner, stride_xo, stride_xn, stride_xh, stride_wv, stride_wh, stride_gw,
    stride_gx, weight_tiles,
    ACCUMULATE_X: tl.constexpr, HAS_LO: tl.constexpr, EVEN_N: tl.constexpr, EVEN_WIDTH: tl.constexpr,
    EVEN_H: tl.constexpr, SPLIT_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The two GEMMs of one chunk's dz (d: (N, >= width rounded up to BLOCK_M), d[n, j] = dz[n, vocab_start + j]).

    Programs [0, weight_tiles): gw[vocab_start + j, :] = sum over all n of d[n, j] x[n, :], one
    [BLOCK_M vocab, BLOCK_N hidden] tile each, written once in gw's dtype.
    The rest: gx[n, :] (+)= sum over j < width of d[n, j] w[vocab_start + j, :], one [BLOCK_M tokens,
    BLOCK_N hidden] tile each; ACCUMULATE_X adds the previous chunks' sum, kept as gx (+ gx_lo, HAS_LO).
    Indices along a contiguous dimension are masked, never clamped (a clamp hides their contiguity
    from the compiler and the loads stop being 16-byte cp.async copies).
    """
    pid = tl.program_id(0)
    h_tiles = tl.cdiv(H, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if pid < weight_tiles:
        tile_v = pid // h_tiles
        hw = (pid % h_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_hw = hw < H
        # A = d^T: a [BLOCK_M vocab, BLOCK_K tokens] tile read column-major out of d (no tl.trans: the
        # compiler then stages it in shared memory by cp.async like any operand); vocabulary columns
        # past `width` read the scratch's padding (whole tiles are allocated) and are not stored
        local_vocab = tile_v * BLOCK_M + tl.arange(0, BLOCK_M)
        dt_ptrs = d_ptr + local_vocab[:, None] + ks[None, :].to(tl.int64) * stride_d
        xk_ptrs = x_ptr + ks[:, None].to(tl.int64) * stride_xn + hw[None, :] * stride_xh
        for k in range(0, tl.cdiv(N, BLOCK_K)):
            if SPLIT_ROWS:  # the next BLOCK_K tokens' rows, wherever the (outer, inner) view puts them
                xk_ptrs = x_ptr + _x_rows(k * BLOCK_K + ks, N, inner, stride_xo, stride_xn, True)[:, None] \
                    + hw[None, :] * stride_xh
            if EVEN_N:
                dtv = tl.load(dt_ptrs)
                if EVEN_H:
                    xkv = tl.load(xk_ptrs)
                else:
                    xkv = tl.load(xk_ptrs, mask=in_hw[None, :], other=0.0)
            else:
                in_k = ks < N - k * BLOCK_K
                dtv = tl.load(dt_ptrs, mask=in_k[None, :], other=0.0)
                xkv = tl.load(xk_ptrs, mask=in_k[:, None] & in_hw[None, :], other=0.0)
            acc = _mma(dtv, xkv, acc, DOT_PRECISION, UPCAST)
            dt_ptrs += BLOCK_K * stride_d
            xk_ptrs += BLOCK_K * stride_xn
        gw_out = gw_ptr + (vocab_start + local_vocab).to(tl.int64)[:, None] * stride_gw + hw[None, :]
        tl.store(gw_out, acc.to(gw_ptr.dtype.element_ty), mask=(local_vocab < width)[:, None] & in_hw[None, :])
    else:
        tile = pid - weight_tiles
        rows = (tile // h_tiles).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        hs = (tile % h_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_hs = hs < H
        d_ptrs = d_ptr + tl.minimum(rows, N - 1)[:, None] * stride_d + ks[None, :]
        w_ptrs = w_ptr + (vocab_start + ks)[:, None].to(tl.int64) * stride_wv + hs[None, :] * stride_wh
        for k in range(0, tl.cdiv(width, BLOCK_K)):
            if EVEN_WIDTH:
                dv = tl.load(d_ptrs)
                if EVEN_H:
                    wv = tl.load(w_ptrs)
                else:
                    wv = tl.load(w_ptrs, mask=in_hs[None, :], other=0.0)
            else:
                in_k = ks < width - k * BLOCK_K
                dv = tl.load(d_ptrs, mask=in_k[None, :], other=0.0)
                wv = tl.load(w_ptrs, mask=in_k[:, None] & in_hs[None, :], other=0.0)
            acc = _mma(dv, wv, acc, DOT_PRECISION, UPCAST)
            d_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wv
        offsets = rows[:, None] * stride_gx + hs[None, :]
        mask = (rows < N)[:, None] & in_hs[None, :]
        if ACCUMULATE_X:
            acc += tl.load(gx_ptr + offsets, mask=mask, other=0.0).to(ACC)
            if HAS_LO:
                acc += tl.load(gx_lo_ptr + offsets, mask=mask, other=0.0).to(ACC)
        hi = acc.to(gx_ptr.dtype.element_ty)
        tl.store(gx_ptr + offsets, hi, mask=mask)
        if HAS_LO:  # the part of the fp32 sum that hi could not hold
            tl.store(gx_lo_ptr + offsets, (acc - hi.to(ACC)).to(gx_lo_ptr.dtype.element_ty), mask=mask)


# -- launchers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """hidden's rows and everything the launchers derive from the inputs alone.

    Row r of hidden lies at ``x + r * stride_xn`` (one strided matrix), or with ``split_rows`` at
    ``x + (r // inner) * stride_xo + (r % inner) * stride_xn`` (an (outer, inner, H) view such as
    ``hidden[:, :-1]``, read in place); its H entries are ``stride_xh`` apart."""

    x: torch.Tensor
    rows: int
    hidden_size: int
    inner: int
    stride_xo: int
    stride_xn: int
    stride_xh: int
    split_rows: bool
    copied: bool  # x is a copy of hidden (no 1- or 2-level row layout fits): extra memory
    weight: torch.Tensor
    bias: torch.Tensor | None
    acc: torch.dtype
    dot_precision: str
    upcast: bool
    config: LinearHeadConfig

    @property
    def vocab(self) -> int:
        return self.weight.size(0)

    @property
    def x_layout(self) -> tuple:
        """The kernels' (inner, stride_xo, stride_xn, stride_xh) arguments."""
        return self.inner, self.stride_xo, self.stride_xn, self.stride_xh


def _row_layout(hidden: torch.Tensor):
    """(x, inner, stride_xo, stride_xn, stride_xh, split_rows, copied) of hidden (..., H): its rows as one
    strided matrix when they are one, else as an (outer, inner) pair of strides, else a copy."""
    size = hidden.size(-1)
    try:
        x = hidden.view(-1, size)
        return x, x.size(0), 0, x.stride(0), x.stride(1), False, False
    except RuntimeError:  # not one strided matrix
        pass
    lead = hidden.shape[:-1]
    for split in range(1, len(lead)):
        try:
            x = hidden.view(math.prod(lead[:split]), math.prod(lead[split:]), size)
        except RuntimeError:
            continue
        return x, x.size(1), x.stride(0), x.stride(1), x.stride(2), True, False
    x = hidden.reshape(-1, size)
    return x, x.size(0), 0, x.stride(0), x.stride(1), False, True


def _problem(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             config: LinearHeadConfig | None) -> _Problem:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"hidden must be fp32, bf16, fp16 or fp64; got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("hidden, weight and bias must share one dtype")
    x, inner, stride_xo, stride_xn, stride_xh, split_rows, copied = _row_layout(hidden)
    if hidden.dtype == torch.float64:
        precision = "ieee"
    elif hidden.dtype == torch.float32:
        precision = "tf32" if (hidden.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = "tf32"  # ignored by Triton for 16-bit operands
    upcast = _interpreting() and hidden.dtype == torch.bfloat16
    return _Problem(x, hidden.numel() // hidden.size(-1), hidden.size(-1), inner, stride_xo, stride_xn, stride_xh,
                    split_rows, copied, weight, bias, accumulate_dtype(hidden.dtype), precision, upcast,
                    config or default_config(hidden.device, hidden.dtype, precision == "tf32"))


def _split(value: float) -> tuple[float, float]:
    """(hi, lo) fp32 halves of a Python float: see ``_scalar``."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _pieces(problem: _Problem) -> int:
    """Vocabulary pieces per token tile: about WAVES programs per SM, at most one per vocabulary tile."""
    blocks = problem.config.fwd
    vocab_tiles = cdiv(problem.vocab, blocks.block_n)
    if problem.config.pieces is not None:
        return max(1, min(problem.config.pieces, vocab_tiles))
    token_tiles = cdiv(problem.rows, blocks.block_m)
    sms = _num_sms(problem.x.device.index or 0) if problem.x.is_cuda else 1
    return max(1, min(vocab_tiles, (WAVES * sms) // token_tiles))


def linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, inv_temperature: float, ignore_index: int, has_ignore: bool,
                              with_entropy: bool, *, config: LinearHeadConfig | None = None):
    """Per-token log p(target) (and entropy) under softmax((hidden @ weight.T + bias) * inv_temperature).

    hidden (..., H) with N = hidden.numel() / H rows, weight (V, H), bias (V,) or None, one dtype;
    targets (N,) int64, each in [0, V) or == ignore_index (else NaN at that row: checked on the device). Returns
    (logp, entropy, lse), each (N,) fp32 (fp64 for fp64 inputs); entropy is empty unless with_entropy;
    ignored rows get 0 in all three. The contract of the C++ kernel torch.ops.cai_kernels_cpu.
    linear_token_logprobs_fwd, without its blocking arguments.
    """
    problem = _problem(hidden, weight, bias, config)
    N, H, V, acc = problem.rows, problem.hidden_size, problem.vocab, problem.acc
    device = hidden.device
    logp = torch.empty(N, dtype=acc, device=device)
    lse = torch.empty(N, dtype=acc, device=device)
    entropy = torch.empty(N if with_entropy else 0, dtype=acc, device=device)
    if N == 0:
        return logp, entropy, lse
    fwd, x = problem.config.fwd, problem.x  # x: hidden's rows in one of two layouts (see _Problem)
    pieces = _pieces(problem)
    scale = _split(inv_temperature * LOG2E)
    partials = torch.empty((3 if with_entropy else 2, pieces, N), dtype=acc, device=device)
    bias_arg = weight if bias is None else bias  # any pointer: not read without HAS_BIAS
    grid = (cdiv(N, fwd.block_m) * pieces,)
    linear_head_fwd_kernel[grid](
        x, weight, bias_arg, partials,
        N, V, H, *problem.x_layout, weight.stride(0), weight.stride(1),
        pieces, *scale,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, EVEN_K=H % fwd.block_k == 0,
        SPLIT_ROWS=problem.split_rows,
        BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_K=fwd.block_k,
        DOT_PRECISION=problem.dot_precision, UPCAST=problem.upcast,
        num_warps=fwd.num_warps, num_stages=fwd.num_stages,
    )
    rows_per_program = problem.config.merge_rows
    linear_head_merge_kernel[(cdiv(N, rows_per_program),)](
        partials, x, weight, bias_arg, targets, logp, entropy if with_entropy else lse, lse,
        N, H, V, *problem.x_layout, weight.stride(0), weight.stride(1),
        pieces, *scale, ignore_index,
        HAS_BIAS=bias is not None, HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, SPLIT_ROWS=problem.split_rows,
        BLOCK_R=rows_per_program, BLOCK_H=problem.config.merge_cols, num_warps=4,
    )
    return logp, entropy, lse


def vocab_chunk(problem_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, config: LinearHeadConfig,
                need_hidden: bool = True, hidden_copied: bool = False) -> int:
    """Columns of dz materialized per backward step: what keeps scratch + lo (+ the copy of hidden, when
    its rows were not one strided matrix) within ``config.memory_fraction`` of a bf16 (N, V) logits
    tensor, at least 8 grad tiles wide (so that the GEMMs stay large), a multiple of both kernels'
    vocabulary tiles, at most V rounded up."""
    if config.vocab_chunk is not None:
        return config.vocab_chunk
    element = torch.empty((), dtype=dtype).element_size()
    step = math.lcm(config.dlogits.block_n, config.grad.block_m, config.grad.block_k)
    lo_bytes = problem_rows * hidden_size * element if (need_hidden and element == 2) else 0
    copy_bytes = problem_rows * hidden_size * element if hidden_copied else 0
    budget = config.memory_fraction * problem_rows * vocab * 2 - lo_bytes - copy_bytes
    columns = int(budget // max(1, problem_rows * element))
    columns = max(columns // step * step, 8 * step)
    return min(columns, cdiv(vocab, step) * step)


def linear_token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor,
                              weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                              lse: torch.Tensor, entropy: torch.Tensor, inv_temperature: float, ignore_index: int,
                              has_ignore: bool, need_hidden: bool, need_weight: bool, need_bias: bool, *,
                              config: LinearHeadConfig | None = None):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden, weight, bias.

    grad_logp (N,) and lse (N,) in the accumulator dtype; grad_entropy and entropy (N,), or empty
    tensors when the entropy has no gradient (grad_entropy.numel() == 0). Returns (grad_hidden of
    hidden's shape, grad_weight (V, H), grad_bias (V,)) in the inputs' dtype, a fresh empty tensor for
    each one not asked for. Deterministic: no atomics, every sum in a fixed order.
    """
    problem = _problem(hidden, weight, bias, config)
    N, H, V, acc = problem.rows, problem.hidden_size, problem.vocab, problem.acc
    need_bias = need_bias and bias is not None
    with_entropy = grad_entropy.numel() > 0
    device, dtype, cfg, x = hidden.device, hidden.dtype, problem.config, problem.x
    grad_hidden = torch.empty((N, H), dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.empty((V, H), dtype=dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=device) if need_bias else None
    if N == 0 or not (need_hidden or need_weight or need_bias):
        if need_hidden:
            grad_hidden.zero_()
        if need_weight:
            grad_weight.zero_()
        return _finish(hidden, grad_hidden, grad_weight, grad_bias, bias)

    chunk = vocab_chunk(N, H, V, dtype, cfg, need_hidden, problem.copied)
    scale = _split(inv_temperature * LOG2E)
    dl, gr = cfg.dlogits, cfg.grad
    # whole grad tiles of columns: the grad-W programs read a tile's padding instead of clamping indices
    scratch = torch.empty((N, cdiv(chunk, gr.block_m) * gr.block_m), dtype=dtype, device=device)
    token_tiles = cdiv(N, dl.block_m)
    bias_part = torch.empty((token_tiles, chunk) if need_bias else (0,), dtype=acc, device=device)
    has_lo = need_hidden and dtype in (torch.bfloat16, torch.float16)
    grad_hidden_lo = torch.empty((N, H), dtype=dtype, device=device) if has_lo else None
    h_tiles = cdiv(H, gr.block_n)
    bias_arg = weight if bias is None else bias
    for chunk_index, vocab_start in enumerate(range(0, V, chunk)):
        width = min(chunk, V - vocab_start)
        linear_head_dlogits_kernel[(token_tiles * cdiv(width, dl.block_n),)](
            x, weight, bias_arg, targets, grad_logp, grad_entropy if with_entropy else grad_logp, lse,
            entropy if with_entropy else lse, scratch, bias_part if need_bias else scratch,
            N, V, H, vocab_start, width, *problem.x_layout, weight.stride(0), weight.stride(1),
            scratch.stride(0), bias_part.stride(0) if need_bias else 0,
            *scale, ignore_index,
            HAS_BIAS=bias is not None, HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, NEED_BIAS=need_bias,
            EVEN_K=H % dl.block_k == 0, SPLIT_ROWS=problem.split_rows, BLOCK_M=dl.block_m, BLOCK_N=dl.block_n,
            BLOCK_K=dl.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=problem.dot_precision, UPCAST=problem.upcast,
            num_warps=dl.num_warps, num_stages=dl.num_stages,
        )
        if need_bias:
            torch.sum(bias_part[:, :width], dim=0, out=grad_bias[vocab_start:vocab_start + width])
        weight_tiles = cdiv(width, gr.block_m) * h_tiles if need_weight else 0
        hidden_tiles = cdiv(N, gr.block_m) * h_tiles if need_hidden else 0
        if weight_tiles + hidden_tiles == 0:
            continue
        gx = grad_hidden if need_hidden else scratch
        linear_head_grad_kernel[(weight_tiles + hidden_tiles,)](
            scratch, x, weight, grad_weight if need_weight else scratch, gx,
            grad_hidden_lo if has_lo else gx,
            N, H, vocab_start, width, scratch.stride(0), *problem.x_layout, weight.stride(0),
            weight.stride(1), grad_weight.stride(0) if need_weight else 0, gx.stride(0) if need_hidden else 0,
            weight_tiles,
            ACCUMULATE_X=chunk_index > 0, HAS_LO=has_lo, EVEN_N=N % gr.block_k == 0,
            EVEN_WIDTH=width % gr.block_k == 0, EVEN_H=H % gr.block_n == 0, SPLIT_ROWS=problem.split_rows,
            BLOCK_M=gr.block_m, BLOCK_N=gr.block_n, BLOCK_K=gr.block_k,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            DOT_PRECISION=problem.dot_precision, UPCAST=problem.upcast,
            num_warps=gr.num_warps, num_stages=gr.num_stages,
        )
    return _finish(hidden, grad_hidden, grad_weight, grad_bias, bias)


def _finish(hidden, grad_hidden, grad_weight, grad_bias, bias):
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    # a gradient not asked for is a fresh empty tensor (outputs of a custom op must not alias each other)
    return tuple(hidden.new_empty(0) if g is None else g for g in (grad_hidden, grad_weight, grad_bias))


def with_config(config: LinearHeadConfig, **changes) -> LinearHeadConfig:
    """A copy of ``config`` with some fields replaced (benchmark sweeps)."""
    return replace(config, **changes)


# -- ahead-of-time checks (python -m cai_kernels.triton._aot) -----------------------------------------

def _aot_specs():
    """Each kernel as the JIT builds it at the H100 / H200 (sm_90a) and A100 (sm_80) blockings on
    aligned inputs with unit inner strides (what it specializes on): 16-bit GEMMs must issue HGMMA /
    HMMA, fp32 under TF32 too; exact fp32 (ieee) runs on FMA units by design."""
    from ._aot import AotSpec

    dims = {"N": "i32", "V": "i32", "H": "i32", "inner": "i32", "stride_xo": "i32", "stride_xn": "i32",
            "stride_xh": "constexpr", "stride_wv": "i32", "stride_wh": "constexpr"}
    unit = {"stride_xh": 1, "stride_wh": 1}
    aligned_dims = ("N", "V", "H", "stride_xo", "stride_xn", "stride_wv")
    specs = []
    for arch, config in (("sm_90a", HOPPER), ("sm_80", AMPERE)):
        # split_rows: hidden's rows as an (outer, inner) view (``hidden[:, :-1]``), read in place
        for dtype, precision, entropy, bias, split_rows in (
                ("bf16", "tf32", True, False, False), ("bf16", "tf32", False, True, False),
                ("bf16", "tf32", True, True, True), ("fp16", "tf32", True, True, False),
                ("fp32", "tf32", True, True, False), ("fp32", "ieee", False, False, False),
                ("fp64", "ieee", True, True, False)):
            tensor_cores = precision == "tf32"
            acc = "fp64" if dtype == "fp64" else "fp32"
            # exact fp32 / fp64: their own (smaller) blocking
            blocking = config if tensor_cores else EXACT_FP32 if dtype == "fp32" else FP64
            label = f"{dtype}{'+tf32' if dtype == 'fp32' and tensor_cores else ''}" + \
                    f"{'+entropy' if entropy else ''}{'+bias' if bias else ''}{'+split_rows' if split_rows else ''}"
            flags = {"HAS_BIAS": bias, "WITH_ENTROPY": entropy, "EVEN_K": True, "SPLIT_ROWS": split_rows,
                     "DOT_PRECISION": precision, "UPCAST": False}
            blocks = blocking.fwd
            specs.append(AotSpec(
                "linear_head_fwd_kernel",
                {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "part_ptr": f"*{acc}"} | dims
                | {"pieces": "i32", "scale_hi": "fp32", "scale_lo": "fp32"}
                | dict.fromkeys(list(flags) + ["BLOCK_M", "BLOCK_N", "BLOCK_K"], "constexpr"),
                unit | flags | {"BLOCK_M": blocks.block_m, "BLOCK_N": blocks.block_n, "BLOCK_K": blocks.block_k},
                aligned=("x_ptr", "w_ptr", "b_ptr", "part_ptr") + aligned_dims,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages, tensor_cores=tensor_cores,
                archs=(arch,), label=label))
            if dtype == "fp32" and not tensor_cores:
                continue
            blocks = blocking.dlogits
            flags = {"HAS_BIAS": bias, "HAS_IGNORE": True, "WITH_ENTROPY": entropy, "NEED_BIAS": bias,
                     "EVEN_K": True, "SPLIT_ROWS": split_rows, "DOT_PRECISION": precision, "UPCAST": False}
            specs.append(AotSpec(
                "linear_head_dlogits_kernel",
                {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "targets_ptr": "*i64",
                 "grad_logp_ptr": f"*{acc}", "grad_entropy_ptr": f"*{acc}", "lse_ptr": f"*{acc}",
                 "entropy_ptr": f"*{acc}", "d_ptr": f"*{dtype}", "bias_part_ptr": f"*{acc}"} | dims
                | {"vocab_start": "i32", "width": "i32", "stride_d": "i32", "stride_bias_part": "i32",
                   "scale_hi": "fp32", "scale_lo": "fp32", "ignore_index": "i32"}
                | dict.fromkeys(list(flags) + ["BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"], "constexpr"),
                unit | flags | {"BLOCK_M": blocks.block_m, "BLOCK_N": blocks.block_n, "BLOCK_K": blocks.block_k,
                                "GROUP_M": blocking.group_m},
                aligned=("x_ptr", "w_ptr", "b_ptr", "targets_ptr", "grad_logp_ptr", "grad_entropy_ptr", "lse_ptr",
                         "entropy_ptr", "d_ptr", "bias_part_ptr", "vocab_start", "width", "stride_d",
                         "stride_bias_part") + aligned_dims,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages, tensor_cores=tensor_cores,
                archs=(arch,), label=label))
            if not entropy:
                continue
            blocks = blocking.grad
            has_lo = dtype in ("bf16", "fp16")
            flags = {"ACCUMULATE_X": True, "HAS_LO": has_lo, "EVEN_N": True, "EVEN_WIDTH": True, "EVEN_H": False,
                     "SPLIT_ROWS": split_rows, "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                     "DOT_PRECISION": precision, "UPCAST": False}
            specs.append(AotSpec(
                "linear_head_grad_kernel",
                {"d_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "gw_ptr": f"*{dtype}",
                 "gx_ptr": f"*{dtype}", "gx_lo_ptr": f"*{dtype}"}
                | {k: v for k, v in dims.items() if k != "V"}
                | {"vocab_start": "i32", "width": "i32", "stride_d": "i32", "stride_gw": "i32", "stride_gx": "i32",
                   "weight_tiles": "i32"}
                | dict.fromkeys(list(flags) + ["BLOCK_M", "BLOCK_N", "BLOCK_K"], "constexpr"),
                unit | flags | {"BLOCK_M": blocks.block_m, "BLOCK_N": blocks.block_n, "BLOCK_K": blocks.block_k},
                aligned=("d_ptr", "x_ptr", "w_ptr", "gw_ptr", "gx_ptr", "gx_lo_ptr", "N", "H", "stride_xo", "stride_xn",
                         "stride_wv", "vocab_start", "width", "stride_d", "stride_gw", "stride_gx"),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages, tensor_cores=tensor_cores,
                archs=(arch,), label=label + ("+lo" if has_lo else "")))
        specs.append(AotSpec(
            "linear_head_merge_kernel",
            {"part_ptr": "*fp32", "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "targets_ptr": "*i64",
             "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "H": "i32", "V": "i32",
             "inner": "i32", "stride_xo": "i32", "stride_xn": "i32", "stride_xh": "constexpr", "stride_wv": "i32",
             "stride_wh": "constexpr", "pieces": "i32", "scale_hi": "fp32", "scale_lo": "fp32", "ignore_index": "i32",
             "HAS_BIAS": "constexpr", "HAS_IGNORE": "constexpr", "WITH_ENTROPY": "constexpr", "BLOCK_R": "constexpr",
             "BLOCK_H": "constexpr", "SPLIT_ROWS": "constexpr"},
            unit | {"HAS_BIAS": True, "HAS_IGNORE": True, "WITH_ENTROPY": True, "BLOCK_R": config.merge_rows,
                    "BLOCK_H": config.merge_cols, "SPLIT_ROWS": False},
            aligned=("part_ptr", "x_ptr", "w_ptr", "b_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "N",
                     "H", "stride_xn", "stride_wv"),
            num_warps=4, archs=(arch,), label="bf16+entropy+bias"))
    return specs


AOT_SPECS = _aot_specs()
