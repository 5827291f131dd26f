"""Shared machinery of the PPO clipped losses (ppo_policy_loss, ppo_value_loss): the row loops, forward and
backward, around a per-token formula, and the aggregation over rows (csrc/cpu/clipped_loss.h is the same).

Each loss supplies its per-token formula as the constexpr TOKEN, a @triton.jit function
    TOKEN(x, y, z, arg0, arg1, arg2, OPTION) -> (loss, s0, s1, s2, s3, d loss / d x)
of its three (B, T) inputs and up to three scalars and one constexpr flag (which they are is the loss's
business: ``ppo_policy_loss.policy_token``, ``ppo_value_loss.value_token``), with up to four per-token
statistics s0..s3. The forward writes per-row sums; ``clipped_loss_finish_kernel`` turns them into the loss under
``agg``, the statistics and the per-row weights w_b with loss = sum_b w_b * sum_t loss_bt, which is all the
backward needs.
Launches: two forward (rows, then ``clipped_loss_finish_kernel``), one backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import Agg
from .._validation import accumulate_dtype
from ._launch import as_kernel_mask, pow2_block


@triton.jit
def max_grad(a, b, da, db):
    """d max(a, b) as torch.maximum: the larger branch's, their mean on a tie, their sum when either is NaN
    (neither is smaller: autograd passes the gradient to both)."""
    return tl.where(a > b, da, tl.where(b > a, db, tl.where(a == b, 0.5 * (da + db), da + db)))


@triton.jit
def clipped_loss_fwd_kernel(
    x_ptr, y_ptr, z_ptr, mask_ptr, partials_ptr,
    T, stride_x, stride_y, stride_z, stride_m, arg0, arg1, arg2,
    TOKEN: tl.constexpr, OPTION: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per row: (loss sum, response tokens, four statistic sums) into partials (B, 6)."""
    row = tl.program_id(0).to(tl.int64)
    acc_dtype = partials_ptr.dtype.element_ty
    sums = tl.zeros((BLOCK_T,), acc_dtype)
    count = tl.zeros((BLOCK_T,), acc_dtype)
    s0 = tl.zeros((BLOCK_T,), acc_dtype)
    s1 = tl.zeros((BLOCK_T,), acc_dtype)
    s2 = tl.zeros((BLOCK_T,), acc_dtype)
    s3 = tl.zeros((BLOCK_T,), acc_dtype)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        in_row = cols < T
        valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
        x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + row * stride_y + cols, mask=in_row, other=0.0).to(acc_dtype)
        z = tl.load(z_ptr + row * stride_z + cols, mask=in_row, other=0.0).to(acc_dtype)
        loss, t0, t1, t2, t3, _ = TOKEN(x, y, z, arg0, arg1, arg2, OPTION)
        sums += tl.where(valid, loss, 0.0)
        count += valid.to(acc_dtype)
        s0 += tl.where(valid, t0, 0.0)
        s1 += tl.where(valid, t1, 0.0)
        s2 += tl.where(valid, t2, 0.0)
        s3 += tl.where(valid, t3, 0.0)
    out = partials_ptr + row * 6
    tl.store(out, tl.sum(sums, axis=0))
    tl.store(out + 1, tl.sum(count, axis=0))
    tl.store(out + 2, tl.sum(s0, axis=0))
    tl.store(out + 3, tl.sum(s1, axis=0))
    tl.store(out + 4, tl.sum(s2, axis=0))
    tl.store(out + 5, tl.sum(s3, axis=0))


@triton.jit
def clipped_loss_bwd_kernel(
    grad_loss_ptr, x_ptr, y_ptr, z_ptr, mask_ptr, weights_ptr, out_ptr,
    T, stride_x, stride_y, stride_z, stride_m, col_blocks, arg0, arg1, arg2,
    TOKEN: tl.constexpr, OPTION: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """d loss / d x = grad_loss * w_row * TOKEN's derivative on response tokens, 0 elsewhere."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    scale = tl.load(grad_loss_ptr) * tl.load(weights_ptr + row)
    acc_dtype = scale.dtype
    valid = tl.load(mask_ptr + row * stride_m + cols, mask=in_row, other=0) != 0
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(acc_dtype)
    y = tl.load(y_ptr + row * stride_y + cols, mask=in_row, other=0.0).to(acc_dtype)
    z = tl.load(z_ptr + row * stride_z + cols, mask=in_row, other=0.0).to(acc_dtype)
    _, _, _, _, _, grad = TOKEN(x, y, z, arg0, arg1, arg2, OPTION)
    tl.store(out_ptr + row * T + cols, tl.where(valid, scale * grad, 0.0).to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def clipped_loss_finish_kernel(partials_ptr, loss_ptr, stats_ptr, weights_ptr, B,
                               AGG: tl.constexpr, N_STATS: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: (loss, the N_STATS - 1 statistics, row weights) from the per-row partial sums, in fp64, rows in
    order (the rules of csrc/cpu/clipped_loss.h): token-mean: w_b = 1 / N; seq-mean-token-mean: 1 / (n_b R);
    seq-mean-token-sum: 1 / R (N response tokens, n_b in row b, R rows with n_b > 0; rows without response
    tokens weigh 0); the statistics are means over tokens; no response token at all: everything 0."""
    out_dtype = stats_ptr.dtype.element_ty
    tokens = tl.zeros((), tl.float64)
    rows = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        count = tl.load(partials_ptr + b * 6 + 1, mask=b < B, other=0.0).to(tl.float64)
        tokens += tl.sum(count, axis=0)
        rows += tl.sum((count > 0).to(tl.float64), axis=0)
    loss = tl.zeros((), tl.float64)
    s0 = tl.zeros((), tl.float64)
    s1 = tl.zeros((), tl.float64)
    s2 = tl.zeros((), tl.float64)
    s3 = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        row = partials_ptr + b * 6
        count = tl.load(row + 1, mask=b < B, other=0.0).to(tl.float64)
        if AGG == 0:  # token-mean
            weight = tl.where(tokens > 0, 1.0 / tl.maximum(tokens, 1.0), 0.0) + tl.zeros_like(count)
        elif AGG == 1:  # seq-mean-token-mean
            weight = tl.where(count > 0, 1.0 / (tl.maximum(count, 1.0) * tl.maximum(rows, 1.0)), 0.0)
        else:  # seq-mean-token-sum
            weight = tl.where(count > 0, 1.0 / tl.maximum(rows, 1.0), 0.0)
        weight = tl.where(b < B, weight, 0.0)
        loss += tl.sum(weight * tl.load(row, mask=b < B, other=0.0).to(tl.float64), axis=0)
        s0 += tl.sum(tl.load(row + 2, mask=b < B, other=0.0).to(tl.float64), axis=0)
        s1 += tl.sum(tl.load(row + 3, mask=b < B, other=0.0).to(tl.float64), axis=0)
        s2 += tl.sum(tl.load(row + 4, mask=b < B, other=0.0).to(tl.float64), axis=0)
        s3 += tl.sum(tl.load(row + 5, mask=b < B, other=0.0).to(tl.float64), axis=0)
        tl.store(weights_ptr + b, weight.to(out_dtype), mask=b < B)
    per_token = 1.0 / tl.maximum(tokens, 1.0)
    tl.store(loss_ptr, loss.to(out_dtype))
    if N_STATS > 1:
        tl.store(stats_ptr, (s0 * per_token).to(out_dtype))
    if N_STATS > 2:
        tl.store(stats_ptr + 1, (s1 * per_token).to(out_dtype))
    if N_STATS > 3:
        tl.store(stats_ptr + 2, (s2 * per_token).to(out_dtype))
    if N_STATS > 4:
        tl.store(stats_ptr + 3, (s3 * per_token).to(out_dtype))


FINISH_BLOCK_B = 1024


def clipped_loss_fwd(x, y, z, mask, *, token, scalars: tuple[float, float, float], option: bool, agg: Agg,
                     n_stats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d, the n_stats - 1 statistics, row weights) of the loss whose per-token formula is ``token``
    (B, T inputs, unit stride along T): two launches (the rows' partial sums, then the reduction over rows)."""
    B, T = x.shape
    acc = accumulate_dtype(x.dtype)
    partials = torch.empty(B, 6, dtype=acc, device=x.device)  # every row written
    if B:
        clipped_loss_fwd_kernel[(B,)](
            x, y, z, as_kernel_mask(mask), partials, T, x.stride(0), y.stride(0), z.stride(0), mask.stride(0),
            *scalars, TOKEN=token, OPTION=option, BLOCK_T=pow2_block(T, 1024))
    loss = torch.empty((), dtype=acc, device=x.device)
    stats = torch.empty(n_stats - 1, dtype=acc, device=x.device)
    weights = torch.empty(B, dtype=acc, device=x.device)
    clipped_loss_finish_kernel[(1,)](partials, loss, stats, weights, B, AGG=int(agg), N_STATS=n_stats,
                                     BLOCK_B=FINISH_BLOCK_B, num_warps=4)
    return loss, stats, weights


def clipped_loss_bwd(grad_loss, x, y, z, mask, row_weights, *, token, scalars: tuple[float, float, float],
                     option: bool) -> torch.Tensor:
    """d loss / d x in x's dtype, from the forward's row weights."""
    B, T = x.shape
    out = torch.empty(B, T, dtype=x.dtype, device=x.device)
    if B and T:
        block = pow2_block(T, 1024)
        col_blocks = -(-T // block)
        if grad_loss.dtype != row_weights.dtype:
            grad_loss = grad_loss.to(row_weights.dtype)
        clipped_loss_bwd_kernel[(B * col_blocks,)](
            grad_loss, x, y, z, as_kernel_mask(mask), row_weights, out, T, x.stride(0),
            y.stride(0), z.stride(0), mask.stride(0), col_blocks, *scalars, TOKEN=token, OPTION=option,
            BLOCK_T=block)
    return out


def clipped_loss_aot_specs(token, label: str):
    """AOT checks of both row loops around ``token`` (its OPTION on), bf16 and fp32 inputs."""
    from ._aot import AotSpec

    specs = []
    aligned = ("x_ptr", "y_ptr", "z_ptr", "mask_ptr", "T", "stride_x", "stride_y", "stride_z", "stride_m")
    scalars = {"arg0": "fp32", "arg1": "fp32", "arg2": "fp32"}
    for dtype in ("bf16", "fp32"):
        inputs = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "mask_ptr": "*u8"} | scalars
        flags = {"TOKEN": token, "OPTION": True, "BLOCK_T": 1024}
        specs.append(AotSpec("clipped_loss_fwd_kernel", inputs | {"partials_ptr": "*fp32"}, flags,
                             aligned=aligned + ("partials_ptr",), label=f"{dtype}+{label}"))
        specs.append(AotSpec("clipped_loss_bwd_kernel",
                             inputs | {"grad_loss_ptr": "*fp32", "weights_ptr": "*fp32", "out_ptr": f"*{dtype}"},
                             flags, aligned=aligned + ("out_ptr",), label=f"{dtype}+{label}"))
    for agg in Agg:
        specs.append(AotSpec("clipped_loss_finish_kernel", {"partials_ptr": "*fp32", "loss_ptr": "*fp32",
                                                            "stats_ptr": "*fp32", "weights_ptr": "*fp32"},
                             {"AGG": int(agg), "N_STATS": 5, "BLOCK_B": FINISH_BLOCK_B},
                             aligned=("partials_ptr", "loss_ptr", "stats_ptr", "weights_ptr"), wide_loads=False,
                             label=f"{label}+agg{int(agg)}"))
    return specs
