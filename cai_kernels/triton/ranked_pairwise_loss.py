"""Triton kernels of ranked_pairwise_loss: InstructGPT's loss over all pairs of K ranked responses.

One program per row loops over the pairs (O(K) memory, never the K x K matrix); the launchers have the
same contracts as the C++ kernels (``csrc/cpu/ranked_pairwise_loss.cpp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import accumulate_dtype, check_num_valid_values
from ._launch import pow2_block
from ._logistic import sigmoid, softplus


@triton.jit
def ranked_pairwise_loss_fwd_kernel(rewards_ptr, num_valid_ptr, row_loss_ptr, K,
                                    HAS_NUM_VALID: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: (1 / P) sum_{i < j < n} softplus(r_j - r_i), looping over i, a block of j at a time."""
    row = tl.program_id(0).to(tl.int64)
    n = K
    if HAS_NUM_VALID:
        n = tl.load(num_valid_ptr + row)
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
    tl.store(row_loss_ptr + row, (tl.sum(acc, axis=0) / pairs.to(tl.float64)).to(row_loss_ptr.dtype.element_ty))


@triton.jit
def ranked_pairwise_loss_bwd_kernel(grad_rows_ptr, rewards_ptr, num_valid_ptr, grad_ptr, K,
                                    HAS_NUM_VALID: tl.constexpr, BLOCK_K: tl.constexpr):
    """d/dr_k = (g / P) [sum_{i < k} sigmoid(r_k - r_i) - sum_{k < j < n} sigmoid(r_j - r_k)], a block of k at a
    time, looping over the other index; 0 at k >= n."""
    row = tl.program_id(0).to(tl.int64)
    n = K
    if HAS_NUM_VALID:
        n = tl.load(num_valid_ptr + row)
    acc_dtype = grad_rows_ptr.dtype.element_ty
    pairs = tl.maximum(n * (n - 1) // 2, 1)
    scale = tl.load(grad_rows_ptr + row) / pairs.to(acc_dtype)
    r_row = rewards_ptr + row * K
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        r_k = tl.load(r_row + k, mask=k < n, other=0.0).to(acc_dtype)
        acc = tl.zeros((BLOCK_K,), acc_dtype)
        for other in range(0, n):
            r_o = tl.load(r_row + other).to(acc_dtype)
            acc += tl.where(other < k, sigmoid(r_k - r_o), 0.0) - tl.where(other > k, sigmoid(r_o - r_k), 0.0)
        grad = tl.where(k < n, acc * scale, 0.0)
        tl.store(grad_ptr + row * K + k, grad.to(grad_ptr.dtype.element_ty), mask=k < K)


def ranked_pairwise_loss_fwd(rewards: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """Same contract as the C++ kernel (csrc/cpu/ranked_pairwise_loss.cpp): rewards (B, K) contiguous,
    num_valid (B,) int64 in [0, K] (else ValueError) or empty. Returns the (B,) per-row losses."""
    B, K = rewards.shape
    if num_valid.numel():
        check_num_valid_values(num_valid, K)
    row_loss = torch.empty(B, dtype=accumulate_dtype(rewards.dtype), device=rewards.device)
    if B:
        ranked_pairwise_loss_fwd_kernel[(B,)](rewards, num_valid if num_valid.numel() else rewards, row_loss, K,
                                              HAS_NUM_VALID=num_valid.numel() > 0, BLOCK_K=pow2_block(K, 128))
    return row_loss


def ranked_pairwise_loss_bwd(grad_rows: torch.Tensor, rewards: torch.Tensor, num_valid: torch.Tensor):
    """Same contract as the C++ kernel: the (B, K) gradient in the rewards' dtype."""
    B, K = rewards.shape
    grad = torch.empty_like(rewards)
    if B:
        ranked_pairwise_loss_bwd_kernel[(B,)](grad_rows, rewards, num_valid if num_valid.numel() else rewards, grad, K,
                                              HAS_NUM_VALID=num_valid.numel() > 0, BLOCK_K=pow2_block(K, 128))
    return grad


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    # The ranked kernels do O(K^2) exp/log per O(K) rewards loaded (and the inner loop loads one scalar per
    # step): compute-bound, so 128-bit loads are not required of them.
    for name, signature in (
        ("ranked_pairwise_loss_fwd_kernel",
         {"rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "row_loss_ptr": "*fp32"}),
        ("ranked_pairwise_loss_bwd_kernel",
         {"grad_rows_ptr": "*fp32", "rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "grad_ptr": "*fp32"}),
    ):
        specs.append(AotSpec(name, signature, {"HAS_NUM_VALID": True, "BLOCK_K": 16}, aligned=tuple(signature),
                             wide_loads=False, label="fp32"))
    return specs


AOT_SPECS = _aot_specs()
