"""Triton kernels of last_token_rewards: a scalar reward head at each sequence's last real token.

The launchers have the same contracts as the C++ kernels (``csrc/cpu/last_token_rewards.cpp``): the
forward reads the mask from the end and one hidden row per sequence; the backward writes a dense
hidden gradient (zeros but at the last tokens) and the head's gradient, summed over sequence chunks in
order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import LastTokenRewardsParams
from .._validation import accumulate_dtype
from ._launch import pow2_block, vector_warps

ROW_BLOCK = 512               # mask positions / hidden units per step of the per-sequence kernels
GRAD_WEIGHT_BLOCK_H = 512
GRAD_WEIGHT_SEQ_CHUNK = 16


@triton.jit
def last_token_rewards_fwd_kernel(
    hidden_ptr, mask_ptr, active_ptr, weight_ptr, bias_ptr, rewards_ptr, index_ptr,
    inner, T, H,
    h_stride_outer, h_stride_inner, h_stride_t, h_stride_h, m_stride_outer, m_stride_inner, m_stride_t,
    HAS_ACTIVE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per sequence s = o * inner + i: index = the highest t with mask != 0 (-1 if none or inactive),
    reward = hidden[s, index] . weight + bias; 0 for an inactive sequence, NaN for an active one without a real
    token (bad data, checked here on the device); nothing out of bounds is read."""
    seq = tl.program_id(0).to(tl.int64)
    outer_idx = seq // inner
    inner_idx = seq % inner
    t_end = T
    no_token = float("nan")
    if HAS_ACTIVE:
        is_active = tl.load(active_ptr + seq) != 0
        t_end = tl.where(is_active, T, 0)
        no_token = tl.where(is_active, float("nan"), 0.0)
    mask_row = mask_ptr + outer_idx * m_stride_outer + inner_idx * m_stride_inner
    last = tl.full((), -1, tl.int64)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        real = tl.load(mask_row + t * m_stride_t, mask=t < t_end, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(real, t, -1).to(tl.int64), axis=0))

    acc_dtype = rewards_ptr.dtype.element_ty
    h_end = tl.where(last >= 0, H, 0)
    hidden_row = (hidden_ptr + outer_idx * h_stride_outer + inner_idx * h_stride_inner
                  + tl.maximum(last, 0) * h_stride_t)
    acc = tl.zeros((BLOCK_H,), acc_dtype)
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        x = tl.load(hidden_row + h * h_stride_h, mask=h < h_end, other=0.0).to(acc_dtype)
        w = tl.load(weight_ptr + h, mask=h < H, other=0.0)
        acc += x * w
    reward = tl.sum(acc, axis=0)
    if HAS_BIAS:
        reward += tl.load(bias_ptr)
    tl.store(rewards_ptr + seq, tl.where(last >= 0, reward, no_token))
    tl.store(index_ptr + seq, last)


@triton.jit
def last_token_grad_hidden_kernel(grad_rewards_ptr, index_ptr, weight_ptr, grad_hidden_ptr, T, H,
                                  BLOCK_H: tl.constexpr):
    """The whole contiguous (N, T, H) gradient in one pass, one program per (sequence, position) row:
    g[s] * weight at the sequence's last real token, zeros elsewhere (no separate zero fill)."""
    pos = tl.program_id(0).to(tl.int64)
    seq = pos // T
    last = tl.load(index_ptr + seq)
    g = tl.load(grad_rewards_ptr + seq)
    at_last = (pos % T) == last
    w_end = tl.where(at_last, H, 0)  # the weight is read at the last real token only
    out_row = grad_hidden_ptr + pos * H
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        w = tl.load(weight_ptr + h, mask=h < w_end, other=0.0)
        # a true zero elsewhere, also where g is NaN or inf (those positions never reach the reward)
        tl.store(out_row + h, tl.where(at_last, g * w, 0.0).to(grad_hidden_ptr.dtype.element_ty), mask=h < H)


@triton.jit
def last_token_grad_weight_kernel(
    grad_rewards_ptr, index_ptr, hidden_ptr, partial_ptr,
    n_seq, inner, H, h_stride_outer, h_stride_inner, h_stride_t, h_stride_h,
    SEQ_CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """partial[c, h] = sum over the SEQ_CHUNK sequences s of chunk c of g[s] hidden[s, index[s], h], and
    partial[c, H] = the sum of g[s] over its sequences with a real token (the bias gradient): a (chunks, H + 1)
    table; with one chunk it is the result, else the launcher adds the chunks in order (deterministic, no
    atomics). Grid: (H slices, sequence chunks)."""
    h = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    chunk = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK_H,), partial_ptr.dtype.element_ty)
    g_sum = tl.zeros((), partial_ptr.dtype.element_ty)
    for step in tl.static_range(SEQ_CHUNK):  # unrolled: the sequences' loads are independent
        seq = chunk * SEQ_CHUNK + step
        in_range = seq < n_seq
        last = tl.load(index_ptr + seq, mask=in_range, other=-1)
        g = tl.load(grad_rewards_ptr + seq, mask=in_range, other=0.0)
        row = (hidden_ptr + (seq // inner) * h_stride_outer + (seq % inner) * h_stride_inner
               + tl.maximum(last, 0) * h_stride_t)
        x = tl.load(row + h * h_stride_h, mask=h < tl.where(last >= 0, H, 0), other=0.0)
        acc += g * x.to(acc.dtype)
        g_sum += tl.where(last >= 0, g, 0.0)
    out = partial_ptr + chunk * (H + 1)
    tl.store(out + h, acc, mask=h < H)
    if tl.program_id(0) == 0:
        tl.store(out + H, g_sum)


def last_token_rewards_fwd(hidden: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, params: LastTokenRewardsParams):
    """Same contract as the C++ kernel (csrc/cpu/last_token_rewards.cpp), but an active sequence without a real
    token gets a NaN reward (index -1), checked on the device (the C++ kernel raises ValueError naming
    params.mask_name; the ops layer checks the indices of CPU tensors)."""
    outer, inner, T, H = hidden.shape
    n_seq = outer * inner
    rewards = torch.empty(n_seq, dtype=accumulate_dtype(hidden.dtype), device=hidden.device)
    index = torch.empty(n_seq, dtype=torch.int64, device=hidden.device)
    if n_seq:
        last_token_rewards_fwd_kernel[(n_seq,)](
            hidden, mask, active if active.numel() else mask, weight, bias if bias.numel() else weight,
            rewards, index, inner, T, H, *hidden.stride(), *mask.stride(),
            HAS_ACTIVE=active.numel() > 0, HAS_BIAS=bias.numel() > 0,
            BLOCK_T=pow2_block(T, ROW_BLOCK), BLOCK_H=pow2_block(H, ROW_BLOCK), num_warps=4)
    return rewards, index


def last_token_rewards_bwd(grad_rewards: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor,
                           weight: torch.Tensor, need_hidden: bool, need_weight: bool):
    """Same contract as the C++ kernel: (grad_hidden, grad_weight, grad_bias), empty where not asked for. One
    launch for the hidden states' gradient, one for the head's (two for more than GRAD_WEIGHT_SEQ_CHUNK
    sequences: the chunks' partial sums are added in order)."""
    outer, inner, T, H = hidden.shape
    n_seq = outer * inner
    # an empty tensor for each gradient not asked for (allocated only then: each is a ~1.5 us call)
    if not need_hidden:
        grad_hidden = hidden.new_empty(0)
    if not need_weight:
        grad_weight, grad_bias = weight.new_empty(0), weight.new_empty(0)
    if need_hidden:
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if n_seq and T and H:
            last_token_grad_hidden_kernel[(n_seq * T,)](grad_rewards, index, weight, grad_hidden, T, H,
                                                        BLOCK_H=pow2_block(H, ROW_BLOCK), num_warps=4)
    if need_weight:
        block_h = pow2_block(H, GRAD_WEIGHT_BLOCK_H)
        chunks = max(-(-n_seq // GRAD_WEIGHT_SEQ_CHUNK), 1)
        partial = torch.empty((chunks, H + 1), dtype=weight.dtype, device=weight.device)
        if n_seq:
            last_token_grad_weight_kernel[(-(-H // block_h), chunks)](
                grad_rewards, index, hidden, partial, n_seq, inner, H, *hidden.stride(),
                SEQ_CHUNK=GRAD_WEIGHT_SEQ_CHUNK, BLOCK_H=block_h, num_warps=vector_warps(block_h, hidden))
        else:
            partial.zero_()
        total = partial[0] if chunks == 1 else partial.sum(0)
        grad_weight, grad_bias = total[:H], total[H:]
    return grad_hidden, grad_weight, grad_bias


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    # hidden (B, T, H) bf16 viewed as (B, 1, T, H) with a contiguous last dim: the JIT specializes a stride of 1
    # as a constant, so h_stride_h and m_stride_t are constexprs here, as they are at run time.
    specs.append(AotSpec(
        "last_token_rewards_fwd_kernel",
        {"hidden_ptr": "*bf16", "mask_ptr": "*i64", "active_ptr": "*i1", "weight_ptr": "*fp32", "bias_ptr": "*fp32",
         "rewards_ptr": "*fp32", "index_ptr": "*i64"},
        {"h_stride_h": 1, "m_stride_t": 1, "HAS_ACTIVE": False, "HAS_BIAS": True, "BLOCK_T": ROW_BLOCK,
         "BLOCK_H": ROW_BLOCK},
        aligned=("hidden_ptr", "mask_ptr", "weight_ptr", "rewards_ptr", "index_ptr", "T", "H", "h_stride_outer",
                 "h_stride_inner", "h_stride_t", "m_stride_outer", "m_stride_inner"),
        label="bf16"))
    specs.append(AotSpec(
        "last_token_grad_hidden_kernel",
        {"grad_rewards_ptr": "*fp32", "index_ptr": "*i64", "weight_ptr": "*fp32", "grad_hidden_ptr": "*bf16"},
        {"BLOCK_H": ROW_BLOCK},
        aligned=("grad_rewards_ptr", "index_ptr", "weight_ptr", "grad_hidden_ptr", "T", "H"), label="bf16"))
    specs.append(AotSpec(
        "last_token_grad_weight_kernel",
        {"grad_rewards_ptr": "*fp32", "index_ptr": "*i64", "hidden_ptr": "*bf16", "partial_ptr": "*fp32"},
        {"h_stride_h": 1, "SEQ_CHUNK": GRAD_WEIGHT_SEQ_CHUNK, "BLOCK_H": GRAD_WEIGHT_BLOCK_H},
        aligned=("grad_rewards_ptr", "index_ptr", "hidden_ptr", "partial_ptr", "H", "h_stride_outer",
                 "h_stride_inner", "h_stride_t"),
        num_warps=GRAD_WEIGHT_BLOCK_H // (32 * 8), label="bf16"))
    return specs


AOT_SPECS = _aot_specs()
