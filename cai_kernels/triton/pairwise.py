"""Triton kernels for the preference-model family: the soft-label pairwise loss, the reward head at each
sequence's last real token, and InstructGPT's ranked loss over all pairs of K responses.

The launchers have the same contracts as the C++ kernels (``csrc/cpu/pairwise_loss.cpp``,
``last_token_rewards.cpp``, ``ranked_pairwise_loss.cpp``); the math is in their headers and in
``cai_kernels/reference/pairwise.py``. In short, with e = exp(-|x|) <= 1 (nothing overflows):
    softplus(x) = max(x, 0) + log1p(e),   sigmoid(x) = x >= 0 ? 1 / (1 + e) : e / (1 + e)
    pair loss   = log1p(e^-|d|) + d * (d > 0 ? 1 - p : -p),   dloss/dd = (1 - p) sigmoid(d) - p sigmoid(-d)
Data-dependent checks (labels in [0, 1], a real token in every sequence, num_valid in [0, K]) are the
caller's: ``cai_kernels/ops`` runs them on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.logprobs import accumulate_dtype

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 with full relative precision for tiny x (Goldberg: log(u) * x / (u - 1), u = 1 + x
    rounded; exact algebra since u - 1 is the x that u really holds). Triton has no log1p; tl.log is libdevice's
    logf on GPUs, accurate near 1."""
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    return tl.where(x >= 0, big, e * big)


@triton.jit
def _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value, margin_value,
                 acc_dtype: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """d = chosen - rejected - margin and p for a block of rows, in the accumulation dtype."""
    chosen = tl.load(chosen_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
    rejected = tl.load(rejected_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
    d = chosen - rejected
    if HAS_MARGIN:
        d -= tl.load(margin_ptr + rows, mask=in_range, other=0.0)
    else:
        d -= margin_value
    if HAS_LABELS:
        p = tl.load(labels_ptr + rows, mask=in_range, other=1.0)
    else:
        p = tl.zeros(d.shape, acc_dtype) + label_value
    return d, p


@triton.jit
def pairwise_loss_fwd_kernel(
    chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, loss_ptr, block_sums_ptr,
    N, label_value, margin_value,
    HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-pair losses into loss_ptr, or (REDUCE) one float64 partial sum per program into block_sums_ptr."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    acc_dtype = loss_ptr.dtype.element_ty
    d, p = _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value,
                        margin_value, acc_dtype, HAS_LABELS, HAS_MARGIN)
    loss = _log1p(tl.exp(-tl.abs(d))) + d * tl.where(d > 0, 1.0 - p, -p)
    if REDUCE:
        tl.store(block_sums_ptr + tl.program_id(0), tl.sum(tl.where(in_range, loss, 0.0).to(tl.float64), axis=0))
    else:
        tl.store(loss_ptr + rows, loss, mask=in_range)


@triton.jit
def pairwise_loss_bwd_kernel(
    grad_ptr, chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, grad_chosen_ptr, grad_rejected_ptr,
    N, label_value, margin_value, grad_scale,
    HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, GRAD_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """dloss/dchosen = g (sigmoid(d) - p) = -dloss/drejected; g per row, or grad_ptr[0] * grad_scale (1 / N for
    a mean) read on the device, so a reduced loss needs no host sync."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    acc_dtype = grad_ptr.dtype.element_ty
    d, p = _pair_inputs(chosen_ptr, rejected_ptr, labels_ptr, margin_ptr, rows, in_range, label_value,
                        margin_value, acc_dtype, HAS_LABELS, HAS_MARGIN)
    if GRAD_PER_ROW:
        g = tl.load(grad_ptr + rows, mask=in_range, other=0.0)
    else:
        g = tl.load(grad_ptr) * grad_scale
    sig = _sigmoid(d)
    sig_neg = _sigmoid(-d)
    grad = ((1.0 - p) * sig - p * sig_neg) * g
    tl.store(grad_chosen_ptr + rows, grad.to(grad_chosen_ptr.dtype.element_ty), mask=in_range)
    tl.store(grad_rejected_ptr + rows, (-grad).to(grad_rejected_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def last_token_rewards_fwd_kernel(
    hidden_ptr, mask_ptr, active_ptr, weight_ptr, bias_ptr, rewards_ptr, index_ptr,
    inner, T, H,
    h_stride_outer, h_stride_inner, h_stride_t, h_stride_h, m_stride_outer, m_stride_inner, m_stride_t,
    HAS_ACTIVE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per sequence s = o * inner + i: index = the highest t with mask != 0 (-1 if none or inactive),
    reward = hidden[s, index] . weight + bias (0 for index -1; nothing out of bounds is read)."""
    seq = tl.program_id(0).to(tl.int64)
    outer_idx = seq // inner
    inner_idx = seq % inner
    t_end = T
    if HAS_ACTIVE:
        t_end = tl.where(tl.load(active_ptr + seq) != 0, T, 0)
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
    tl.store(rewards_ptr + seq, tl.where(last >= 0, reward, 0.0))
    tl.store(index_ptr + seq, last)


@triton.jit
def last_token_grad_hidden_kernel(grad_rewards_ptr, index_ptr, weight_ptr, grad_hidden_ptr, T, H,
                                  BLOCK_H: tl.constexpr):
    """grad_hidden[s, index[s], :] = g[s] * weight, into a zero-filled contiguous (N, T, H) tensor."""
    seq = tl.program_id(0).to(tl.int64)
    last = tl.load(index_ptr + seq)
    g = tl.load(grad_rewards_ptr + seq)
    h_end = tl.where(last >= 0, H, 0)
    out_row = grad_hidden_ptr + (seq * T + tl.maximum(last, 0)) * H
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        w = tl.load(weight_ptr + h, mask=h < h_end, other=0.0)
        tl.store(out_row + h, (g * w).to(grad_hidden_ptr.dtype.element_ty), mask=h < h_end)


@triton.jit
def last_token_grad_weight_kernel(
    grad_rewards_ptr, index_ptr, hidden_ptr, partial_ptr,
    n_seq, inner, H, h_stride_outer, h_stride_inner, h_stride_t, h_stride_h,
    SEQ_CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """partial[c, h] = sum over the SEQ_CHUNK sequences s of chunk c of g[s] hidden[s, index[s], h]; the launcher
    adds the chunks in order (deterministic, no atomics). Grid: (H slices, sequence chunks)."""
    h = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    chunk = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK_H,), partial_ptr.dtype.element_ty)
    for step in tl.static_range(SEQ_CHUNK):  # unrolled: the sequences' loads are independent
        seq = chunk * SEQ_CHUNK + step
        in_range = seq < n_seq
        last = tl.load(index_ptr + seq, mask=in_range, other=-1)
        g = tl.load(grad_rewards_ptr + seq, mask=in_range, other=0.0)
        row = (hidden_ptr + (seq // inner) * h_stride_outer + (seq % inner) * h_stride_inner
               + tl.maximum(last, 0) * h_stride_t)
        x = tl.load(row + h * h_stride_h, mask=h < tl.where(last >= 0, H, 0), other=0.0)
        acc += g * x.to(acc.dtype)
    tl.store(partial_ptr + chunk * H + h, acc, mask=h < H)


@triton.jit
def ranked_pairwise_loss_fwd_kernel(rewards_ptr, num_valid_ptr, row_loss_ptr, K,
                                    HAS_NUM_VALID: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: (1 / P) sum_{i < j < n} softplus(r_j - r_i), looping over i, a block of j at a time."""
    row = tl.program_id(0).to(tl.int64)
    n = K
    if HAS_NUM_VALID:
        n = tl.load(num_valid_ptr + row)
    acc_dtype = row_loss_ptr.dtype.element_ty
    r_row = rewards_ptr + row * K
    acc = tl.zeros((BLOCK_K,), acc_dtype)
    for i in range(0, n - 1):
        r_i = tl.load(r_row + i).to(acc_dtype)
        for start in range(i + 1, n, BLOCK_K):
            j = start + tl.arange(0, BLOCK_K)
            r_j = tl.load(r_row + j, mask=j < n, other=0.0).to(acc_dtype)
            acc += tl.where(j < n, _softplus(r_j - r_i), 0.0)
    pairs = tl.maximum(n * (n - 1) // 2, 1)
    tl.store(row_loss_ptr + row, tl.sum(acc, axis=0) / pairs.to(acc_dtype))


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
            acc += tl.where(other < k, _sigmoid(r_k - r_o), 0.0) - tl.where(other > k, _sigmoid(r_o - r_k), 0.0)
        grad = tl.where(k < n, acc * scale, 0.0)
        tl.store(grad_ptr + row * K + k, grad.to(grad_ptr.dtype.element_ty), mask=k < K)


# ---------------------------------------------------------------------------------------------- launchers

PAIR_BLOCK = 1024
ROW_BLOCK = 512               # mask positions / hidden units per step of the per-sequence kernels
GRAD_WEIGHT_BLOCK_H = 512
GRAD_WEIGHT_SEQ_CHUNK = 16


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 16)), cap)


def _vector_warps(block: int, like: torch.Tensor) -> int:
    """Warps such that each thread holds 16 bytes of a block of ``like``'s dtype (one 128-bit load)."""
    per_thread = max(16 // like.element_size(), 1)
    return max(1, min(8, block // (32 * per_thread)))


def _per_row_if_fp64(values: torch.Tensor, value: float, like: torch.Tensor) -> torch.Tensor:
    """Triton passes Python floats as fp32 scalars: in fp64, a scalar label / margin becomes a per-row tensor."""
    if values.numel() or like.dtype != torch.float64:
        return values
    return torch.full((like.numel(),), value, dtype=torch.float64, device=like.device)


def pairwise_loss_fwd(chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, label_value: float,
                      margin: torch.Tensor, margin_value: float, reduction: int) -> torch.Tensor:
    """Same contract as torch.ops.cai_kernels_cpu.pairwise_loss_fwd (labels already range-checked)."""
    n = chosen.numel()
    acc = accumulate_dtype(chosen.dtype)
    labels, margin = _per_row_if_fp64(labels, label_value, chosen), _per_row_if_fp64(margin, margin_value, chosen)
    grid = (triton.cdiv(n, PAIR_BLOCK),)
    if reduction == REDUCTION_CODES["none"]:
        loss = torch.empty(n, dtype=acc, device=chosen.device)
        block_sums = loss
    else:  # loss_ptr only carries the accumulation dtype here: one element, never written
        loss = torch.empty(1, dtype=acc, device=chosen.device)
        block_sums = torch.empty(grid[0], dtype=torch.float64, device=chosen.device)
    if n:
        pairwise_loss_fwd_kernel[grid](
            chosen, rejected, labels if labels.numel() else chosen, margin if margin.numel() else chosen,
            loss, block_sums, n, label_value, margin_value,
            HAS_LABELS=labels.numel() > 0, HAS_MARGIN=margin.numel() > 0,
            REDUCE=reduction != REDUCTION_CODES["none"], BLOCK=PAIR_BLOCK, num_warps=4)
    if reduction == REDUCTION_CODES["none"]:
        return loss
    total = block_sums.sum()
    if reduction == REDUCTION_CODES["mean"]:
        total = total / n
    return total.to(acc)


def pairwise_loss_bwd(grad: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor,
                      label_value: float, margin: torch.Tensor, margin_value: float, reduction: int):
    """Same contract as torch.ops.cai_kernels_cpu.pairwise_loss_bwd."""
    n = chosen.numel()
    labels, margin = _per_row_if_fp64(labels, label_value, chosen), _per_row_if_fp64(margin, margin_value, chosen)
    grad_chosen, grad_rejected = torch.empty_like(chosen), torch.empty_like(rejected)
    if n:
        per_row = reduction == REDUCTION_CODES["none"]
        pairwise_loss_bwd_kernel[(triton.cdiv(n, PAIR_BLOCK),)](
            grad, chosen, rejected, labels if labels.numel() else chosen, margin if margin.numel() else chosen,
            grad_chosen, grad_rejected, n, label_value, margin_value,
            1.0 / n if reduction == REDUCTION_CODES["mean"] else 1.0,
            HAS_LABELS=labels.numel() > 0, HAS_MARGIN=margin.numel() > 0, GRAD_PER_ROW=per_row,
            BLOCK=PAIR_BLOCK, num_warps=4)
    return grad_chosen, grad_rejected


def last_token_rewards_fwd(hidden: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor):
    """Same contract as torch.ops.cai_kernels_cpu.last_token_rewards_fwd, except that a sequence without a real
    token is not an error here: its index is -1 and the caller checks."""
    outer, inner, T, H = hidden.shape
    n_seq = outer * inner
    rewards = torch.empty(n_seq, dtype=accumulate_dtype(hidden.dtype), device=hidden.device)
    index = torch.empty(n_seq, dtype=torch.int64, device=hidden.device)
    if n_seq:
        last_token_rewards_fwd_kernel[(n_seq,)](
            hidden, mask, active if active.numel() else mask, weight, bias if bias.numel() else weight,
            rewards, index, inner, T, H, *hidden.stride(), *mask.stride(),
            HAS_ACTIVE=active.numel() > 0, HAS_BIAS=bias.numel() > 0,
            BLOCK_T=_block(T, ROW_BLOCK), BLOCK_H=_block(H, ROW_BLOCK), num_warps=4)
    return rewards, index


def last_token_rewards_bwd(grad_rewards: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor,
                           weight: torch.Tensor, need_hidden: bool, need_weight: bool):
    """Same contract as torch.ops.cai_kernels_cpu.last_token_rewards_bwd."""
    outer, inner, T, H = hidden.shape
    n_seq = outer * inner
    grad_hidden = hidden.new_empty(0)
    grad_weight = weight.new_empty(0)
    grad_bias = weight.new_empty(0)
    if need_hidden:
        grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if n_seq and H:
            last_token_grad_hidden_kernel[(n_seq,)](grad_rewards, index, weight, grad_hidden, T, H,
                                                    BLOCK_H=_block(H, ROW_BLOCK), num_warps=4)
    if need_weight:
        block_h = _block(H, GRAD_WEIGHT_BLOCK_H)
        chunks = max(triton.cdiv(n_seq, GRAD_WEIGHT_SEQ_CHUNK), 1)
        partial = torch.zeros((chunks, H), dtype=weight.dtype, device=weight.device)
        if n_seq:
            last_token_grad_weight_kernel[(triton.cdiv(H, block_h), chunks)](
                grad_rewards, index, hidden, partial, n_seq, inner, H, *hidden.stride(),
                SEQ_CHUNK=GRAD_WEIGHT_SEQ_CHUNK, BLOCK_H=block_h, num_warps=_vector_warps(block_h, hidden))
        grad_weight = partial.sum(0)
        grad_bias = torch.where(index >= 0, grad_rewards, 0.0).sum().reshape(1)
    return grad_hidden, grad_weight, grad_bias


def ranked_pairwise_loss_fwd(rewards: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
    """Same contract as torch.ops.cai_kernels_cpu.ranked_pairwise_loss_fwd (num_valid already range-checked)."""
    B, K = rewards.shape
    row_loss = torch.empty(B, dtype=accumulate_dtype(rewards.dtype), device=rewards.device)
    if B:
        ranked_pairwise_loss_fwd_kernel[(B,)](rewards, num_valid if num_valid.numel() else rewards, row_loss, K,
                                              HAS_NUM_VALID=num_valid.numel() > 0, BLOCK_K=_block(K, 128))
    return row_loss


def ranked_pairwise_loss_bwd(grad_rows: torch.Tensor, rewards: torch.Tensor, num_valid: torch.Tensor):
    """Same contract as torch.ops.cai_kernels_cpu.ranked_pairwise_loss_bwd."""
    B, K = rewards.shape
    grad = torch.empty_like(rewards)
    if B:
        ranked_pairwise_loss_bwd_kernel[(B,)](grad_rows, rewards, num_valid if num_valid.numel() else rewards, grad, K,
                                              HAS_NUM_VALID=num_valid.numel() > 0, BLOCK_K=_block(K, 128))
    return grad


# ----------------------------------------------------------------------------------- ahead-of-time checks

def _aot_specs():
    from ._aot import AotSpec

    specs = []
    pair_common = {"N": "i64", "label_value": "fp32", "margin_value": "fp32", "HAS_LABELS": "constexpr",
                   "HAS_MARGIN": "constexpr", "BLOCK": "constexpr"}
    for dtype in ("fp32", "bf16"):
        inputs = {"chosen_ptr": f"*{dtype}", "rejected_ptr": f"*{dtype}", "labels_ptr": "*fp32", "margin_ptr": "*fp32"}
        for reduce in (False, True):
            specs.append(AotSpec(
                "pairwise_loss_fwd_kernel",
                inputs | {"loss_ptr": "*fp32", "block_sums_ptr": "*fp64"} | pair_common | {"REDUCE": "constexpr"},
                {"HAS_LABELS": True, "HAS_MARGIN": True, "REDUCE": reduce, "BLOCK": PAIR_BLOCK},
                aligned=("chosen_ptr", "rejected_ptr", "labels_ptr", "margin_ptr", "loss_ptr", "block_sums_ptr", "N"),
                label=f"{dtype}{'+sum' if reduce else ''}"))
        for per_row in (False, True):
            specs.append(AotSpec(
                "pairwise_loss_bwd_kernel",
                {"grad_ptr": "*fp32"} | inputs | {"grad_chosen_ptr": f"*{dtype}", "grad_rejected_ptr": f"*{dtype}"}
                | pair_common | {"grad_scale": "fp32", "GRAD_PER_ROW": "constexpr"},
                {"HAS_LABELS": True, "HAS_MARGIN": False, "GRAD_PER_ROW": per_row, "BLOCK": PAIR_BLOCK},
                aligned=("grad_ptr", "chosen_ptr", "rejected_ptr", "labels_ptr", "margin_ptr", "grad_chosen_ptr",
                         "grad_rejected_ptr", "N"),
                label=f"{dtype}{'+per-row' if per_row else ''}"))

    # hidden (B, T, H) bf16 viewed as (B, 1, T, H) with a contiguous last dim: the JIT specializes a stride of 1
    # as a constant, so h_stride_h and m_stride_t are constexprs here, as they are at run time.
    strides = {"h_stride_outer": "i64", "h_stride_inner": "i64", "h_stride_t": "i64", "h_stride_h": "constexpr"}
    specs.append(AotSpec(
        "last_token_rewards_fwd_kernel",
        {"hidden_ptr": "*bf16", "mask_ptr": "*i64", "active_ptr": "*i1", "weight_ptr": "*fp32", "bias_ptr": "*fp32",
         "rewards_ptr": "*fp32", "index_ptr": "*i64", "inner": "i64", "T": "i64", "H": "i64"} | strides
        | {"m_stride_outer": "i64", "m_stride_inner": "i64", "m_stride_t": "constexpr", "HAS_ACTIVE": "constexpr",
           "HAS_BIAS": "constexpr", "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"},
        {"h_stride_h": 1, "m_stride_t": 1, "HAS_ACTIVE": False, "HAS_BIAS": True, "BLOCK_T": ROW_BLOCK,
         "BLOCK_H": ROW_BLOCK},
        aligned=("hidden_ptr", "mask_ptr", "weight_ptr", "rewards_ptr", "index_ptr", "T", "H", "h_stride_outer",
                 "h_stride_inner", "h_stride_t", "m_stride_outer", "m_stride_inner"),
        label="bf16"))
    specs.append(AotSpec(
        "last_token_grad_hidden_kernel",
        {"grad_rewards_ptr": "*fp32", "index_ptr": "*i64", "weight_ptr": "*fp32", "grad_hidden_ptr": "*bf16",
         "T": "i64", "H": "i64", "BLOCK_H": "constexpr"},
        {"BLOCK_H": ROW_BLOCK},
        aligned=("grad_rewards_ptr", "index_ptr", "weight_ptr", "grad_hidden_ptr", "T", "H"), label="bf16"))
    specs.append(AotSpec(
        "last_token_grad_weight_kernel",
        {"grad_rewards_ptr": "*fp32", "index_ptr": "*i64", "hidden_ptr": "*bf16", "partial_ptr": "*fp32",
         "n_seq": "i64", "inner": "i64", "H": "i64"} | strides | {"SEQ_CHUNK": "constexpr", "BLOCK_H": "constexpr"},
        {"h_stride_h": 1, "SEQ_CHUNK": GRAD_WEIGHT_SEQ_CHUNK, "BLOCK_H": GRAD_WEIGHT_BLOCK_H},
        aligned=("grad_rewards_ptr", "index_ptr", "hidden_ptr", "partial_ptr", "H", "h_stride_outer",
                 "h_stride_inner", "h_stride_t"),
        num_warps=GRAD_WEIGHT_BLOCK_H // (32 * 8), label="bf16"))

    # The ranked kernels do O(K^2) exp/log per O(K) rewards loaded (and the inner loop loads one scalar per
    # step): compute-bound, so 128-bit loads are not required of them.
    for name, signature in (
        ("ranked_pairwise_loss_fwd_kernel",
         {"rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "row_loss_ptr": "*fp32", "K": "i64"}),
        ("ranked_pairwise_loss_bwd_kernel",
         {"grad_rows_ptr": "*fp32", "rewards_ptr": "*fp32", "num_valid_ptr": "*i64", "grad_ptr": "*fp32", "K": "i64"}),
    ):
        specs.append(AotSpec(name, signature | {"HAS_NUM_VALID": "constexpr", "BLOCK_K": "constexpr"},
                             {"HAS_NUM_VALID": True, "BLOCK_K": 16}, aligned=tuple(k for k in signature if k != "K"),
                             wide_loads=False, label="fp32"))
    return specs


AOT_SPECS = _aot_specs()
