"""Shared machinery of the PPO clipped losses (ppo_policy_loss, ppo_value_loss): the row loops, forward and
backward, around a per-token formula, and the aggregation over rows (csrc/cpu/clipped_loss.h is the same).

Each loss supplies its per-token formula as the constexpr TOKEN, a @triton.jit function
    TOKEN(x, y, z, arg0, arg1, arg2, OPTION) -> (loss, s0, s1, s2, s3, d loss / d x)
of its three (B, T) inputs and up to three scalars and one constexpr flag (which they are is the loss's
business: ``ppo_policy_loss.policy_token``, ``ppo_value_loss.value_token``), with up to four per-token
statistics s0..s3. The forward writes per-row sums; ``finish`` turns them into the loss under ``agg`` and
the per-row weights w_b with loss = sum_b w_b * sum_t loss_bt, which is all the backward needs.
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


def finish(partials: torch.Tensor, agg: Agg, n_stats: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats [loss, statistics...], row weights) from per-row partial sums (the rules of csrc/cpu/clipped_loss.h):
    token-mean: w_b = 1 / N; seq-mean-token-mean: 1 / (n_b R); seq-mean-token-sum: 1 / R (N response tokens,
    n_b in row b, R rows with n_b > 0; rows without response tokens weigh 0); statistics are means over tokens."""
    p = partials.double()
    counts = p[:, 1]
    tokens = counts.sum()
    rows = (counts > 0).sum().double()
    if agg == Agg.TOKEN_MEAN:
        weights = (1.0 / tokens.clamp(min=1)).expand_as(counts) * (tokens > 0)
    elif agg == Agg.SEQ_MEAN_TOKEN_MEAN:
        weights = torch.where(counts > 0, 1.0 / (counts.clamp(min=1) * rows.clamp(min=1)), 0.0)
    else:
        weights = torch.where(counts > 0, 1.0 / rows.clamp(min=1), 0.0)
    loss = (weights * p[:, 0]).sum()
    stats = p[:, 2:1 + n_stats].sum(0) / tokens.clamp(min=1)
    return torch.cat([loss[None], stats]).to(dtype), weights.to(dtype).contiguous()


def clipped_loss_fwd(x, y, z, mask, *, token, scalars: tuple[float, float, float], option: bool, agg: Agg,
                     n_stats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats, row weights) of the loss whose per-token formula is ``token`` (B, T inputs, unit stride along T)."""
    B, T = x.shape
    acc = accumulate_dtype(x.dtype)
    partials = torch.zeros(B, 6, dtype=acc, device=x.device)
    if B:
        clipped_loss_fwd_kernel[(B,)](
            x, y, z, as_kernel_mask(mask), partials, T, x.stride(0), y.stride(0), z.stride(0), mask.stride(0),
            *scalars, TOKEN=token, OPTION=option, BLOCK_T=pow2_block(T, 1024))
    return finish(partials, agg, n_stats, acc)


def clipped_loss_bwd(grad_loss, x, y, z, mask, row_weights, *, token, scalars: tuple[float, float, float],
                     option: bool) -> torch.Tensor:
    """d loss / d x in x's dtype, from the forward's row weights."""
    B, T = x.shape
    out = torch.empty(B, T, dtype=x.dtype, device=x.device)
    if B and T:
        block = pow2_block(T, 1024)
        col_blocks = triton.cdiv(T, block)
        clipped_loss_bwd_kernel[(B * col_blocks,)](
            grad_loss.to(row_weights.dtype), x, y, z, as_kernel_mask(mask), row_weights, out, T, x.stride(0),
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
    return specs
