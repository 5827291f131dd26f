"""Triton kernels of ranked_pairwise_loss: InstructGPT's loss over all pairs of K ranked responses.

One program per row loops over the pairs (O(K) memory, never the K x K matrix); the launchers have the
same contracts as the C++ kernels (``csrc/cpu/ranked_pairwise_loss.cpp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import RankedPairwiseLossParams, Reduction
from .._validation import accumulate_dtype
from ._launch import pow2_block
from ._logistic import sigmoid, softplus

FINISH_BLOCK = 1024


@triton.jit
def row_count(num_valid_ptr, row, K, HAS_NUM_VALID: tl.constexpr):
    """(n, bad): the row's count of ranked responses (K without counts); a count outside [0, K] is bad data,
    checked here on the device: bad is True and n is 0 (nothing read)."""
    n = K
    bad = False
    if HAS_NUM_VALID:
        n = tl.load(num_valid_ptr + row)
        bad = (n < 0) | (n > K)
        n = tl.where(bad, 0, n)
    return n, bad


@triton.jit
def ranked_pairwise_loss_fwd_kernel(rewards_ptr, num_valid_ptr, row_loss_ptr, K,
                                    HAS_NUM_VALID: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: (1 / P) sum_{i < j < n} softplus(r_j - r_i), looping over i, a block of j at a time.
    A count n outside [0, K] is bad data, checked here on the device: NaN for that row, nothing read."""
    row = tl.program_id(0).to(tl.int64)
    n, bad = row_count(num_valid_ptr, row, K, HAS_NUM_VALID)
    # pairs in float64 whatever the input dtype (as the C++ kernel): r_j - r_i of two finite fp32 rewards
    # (3e38, -3e38) and the sums of such pair losses overflow fp32; the row's mean is rounded once
    r_row = rewards_ptr + row * K
    acc = tl.zeros((BLOCK_K,), tl.float64)
    for i in range(0, n - 1):
        r_i = tl.load(r_row + i).to(tl.float64)
        for start in range(i + 1, n, BLOCK_K):
            j = start + tl.arange(0, BLOCK_K)
            r_j = tl.load(r_row + j, mask=j < n, other=0.0).to(tl.float64)
            acc += tl.where(j < n, softplus(r_j - r_i), 0.0)
    pairs = tl.maximum(n * (n - 1) // 2, 1)
    mean = tl.sum(acc, axis=0) / pairs.to(tl.float64)
    tl.store(row_loss_ptr + row, tl.where(bad, float("nan"), mean).to(row_loss_ptr.dtype.element_ty))


@triton.jit
def ranked_loss_finish_kernel(row_loss_ptr, num_valid_ptr, loss_ptr, scale_ptr, B, K,
                              HAS_NUM_VALID: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = sum of the row losses (MEAN: / R, R the rows with at least one pair, at least 1) and
    scale = each row's weight in it (1 / R, or 1), rows in order (deterministic)."""
    acc_dtype = loss_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), acc_dtype)
    rows = tl.zeros((BLOCK,), acc_dtype)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        total += tl.load(row_loss_ptr + b, mask=b < B, other=0.0)
        if HAS_NUM_VALID:
            n = tl.load(num_valid_ptr + b, mask=b < B, other=0)
        else:
            n = tl.where(b < B, K, 0)
        rows += (n >= 2).to(acc_dtype)
    scale = tl.full((), 1.0, acc_dtype)
    if MEAN:
        scale = 1.0 / tl.maximum(tl.sum(rows, axis=0), 1.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * scale)
    tl.store(scale_ptr, scale)


@triton.jit
def ranked_pairwise_loss_bwd_kernel(grad_rows_ptr, rewards_ptr, num_valid_ptr, grad_ptr, K, scale_ptr,
                                    HAS_NUM_VALID: tl.constexpr, GRAD_SCALAR: tl.constexpr, BLOCK_K: tl.constexpr):
    """d/dr_k = (g / P) [sum_{i < k} sigmoid(r_k - r_i) - sum_{k < j < n} sigmoid(r_j - r_k)], a block of k at a
    time, looping over the other index; 0 at k >= n; NaN on a row whose count n is outside [0, K]. g is the row's
    gradient, or with GRAD_SCALAR the reduced loss's (grad_rows_ptr[0]) times its rows' weight (scale_ptr[0])."""
    row = tl.program_id(0).to(tl.int64)
    n, bad = row_count(num_valid_ptr, row, K, HAS_NUM_VALID)
    acc_dtype = grad_rows_ptr.dtype.element_ty
    pairs = tl.maximum(n * (n - 1) // 2, 1)
    if GRAD_SCALAR:
        g = tl.load(grad_rows_ptr) * tl.load(scale_ptr)
    else:
        g = tl.load(grad_rows_ptr + row)
    scale = g / pairs.to(acc_dtype)
    r_row = rewards_ptr + row * K
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        r_k = tl.load(r_row + k, mask=k < n, other=0.0).to(acc_dtype)
        acc = tl.zeros((BLOCK_K,), acc_dtype)
        for other in range(0, n):
            r_o = tl.load(r_row + other).to(acc_dtype)
            acc += tl.where(other < k, sigmoid(r_k - r_o), 0.0) - tl.where(other > k, sigmoid(r_o - r_k), 0.0)
        grad = tl.where(bad, float("nan"), tl.where(k < n, acc * scale, 0.0))
        tl.store(grad_ptr + row * K + k, grad.to(grad_ptr.dtype.element_ty), mask=k < K)


def ranked_pairwise_loss_fwd(rewards: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """Same contract as the C++ kernel (csrc/cpu/ranked_pairwise_loss.cpp): rewards (B, K) contiguous,
    num_valid (B,) int64 in [0, K] or empty: checked on the device, a NaN loss for a row whose count is not (the
    C++ kernel raises ValueError; the ops layer checks CPU tensors). Returns the (B,) per-row losses."""
    B, K = rewards.shape
    row_loss = torch.empty(B, dtype=accumulate_dtype(rewards.dtype), device=rewards.device)
    if B:
        ranked_pairwise_loss_fwd_kernel[(B,)](rewards, num_valid if num_valid.numel() else rewards, row_loss, K,
                                              HAS_NUM_VALID=num_valid.numel() > 0, BLOCK_K=pow2_block(K, 128))
    return row_loss


def ranked_pairwise_loss_bwd(grad_rows: torch.Tensor, rewards: torch.Tensor, num_valid: torch.Tensor):
    """Same contract as the C++ kernel: the (B, K) gradient in the rewards' dtype."""
    return _backward(grad_rows, rewards, num_valid, grad_rows, grad_scalar=False)


def _backward(grad: torch.Tensor, rewards: torch.Tensor, num_valid: torch.Tensor, scale: torch.Tensor,
              grad_scalar: bool) -> torch.Tensor:
    B, K = rewards.shape
    out = torch.empty_like(rewards)
    if B:
        ranked_pairwise_loss_bwd_kernel[(B,)](grad, rewards, num_valid if num_valid.numel() else rewards, out, K, scale,
                                              HAS_NUM_VALID=num_valid.numel() > 0, GRAD_SCALAR=grad_scalar,
                                              BLOCK_K=pow2_block(K, 128))
    return out


def ranked_pairwise_loss_reduced_fwd(rewards: torch.Tensor, num_valid: torch.Tensor, params: RankedPairwiseLossParams):
    """The loss reduced over rows (sum, or mean over the rows with a pair), and the rows' weight in it (a (1,)
    tensor): two launches, no host synchronization. Triton only (the C++ kernels return per-row losses)."""
    B, K = rewards.shape
    row_loss = ranked_pairwise_loss_fwd(rewards, num_valid)
    acc = row_loss.dtype
    loss = torch.empty((), dtype=acc, device=rewards.device)
    scale = torch.empty(1, dtype=acc, device=rewards.device)
    ranked_loss_finish_kernel[(1,)](row_loss, num_valid if num_valid.numel() else row_loss, loss, scale, B, K,
                                    HAS_NUM_VALID=num_valid.numel() > 0, MEAN=params.reduction == Reduction.MEAN,
                                    BLOCK=FINISH_BLOCK)
    return loss, scale


def ranked_pairwise_loss_reduced_bwd(grad_loss: torch.Tensor, rewards: torch.Tensor, num_valid: torch.Tensor,
                                     scale: torch.Tensor, params: RankedPairwiseLossParams) -> torch.Tensor:
    """d loss / d rewards from the 0-d upstream gradient and the rows' weight, read on the device."""
    return _backward(grad_loss, rewards, num_valid, scale, grad_scalar=True)


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    # The ranked kernels do O(K^2) exp/log per O(K) rewards loaded (and the inner loop loads one scalar per
    # step): compute-bound, so 128-bit loads are not required of them.
    for name, signature in (
        ("ranked_pairwise_loss_fwd_kernel",
         {"rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "row_loss_ptr": "*fp32"}),
        ("ranked_pairwise_loss_bwd_kernel",
         {"grad_rows_ptr": "*fp32", "rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "grad_ptr": "*fp32",
          "scale_ptr": "*fp32"}),
    ):
        flags = {"HAS_NUM_VALID": True, "BLOCK_K": 16} | ({"GRAD_SCALAR": True} if "scale_ptr" in signature else {})
        specs.append(AotSpec(name, signature, flags, aligned=tuple(signature), wide_loads=False, label="fp32"))
    specs.append(AotSpec("ranked_loss_finish_kernel", {"row_loss_ptr": "*fp32", "num_valid_ptr": "*i64",
                                                       "loss_ptr": "*fp32", "scale_ptr": "*fp32"},
                         {"HAS_NUM_VALID": True, "MEAN": True, "BLOCK": FINISH_BLOCK},
                         aligned=("row_loss_ptr", "num_valid_ptr", "loss_ptr", "scale_ptr"), wide_loads=False,
                         label="fp32+mean"))
    return specs


AOT_SPECS = _aot_specs()
