"""Triton kernel of choice_logprobs' option step: per-option sums and per-question softmax.

One program per question, its options on the lanes of one block (BLOCK_K >= max options):
    option_logprobs[q, k] = sum over option (first[q] + k)'s tokens of log p   (-inf for k >= n_q)
    probs[q, k]           = softmax_k(option_logprobs[q, :n_q]), clamped       (0 for k >= n_q)
The tokens of each option are found through a CSR layout built with torch ops on the device
(tokens sorted by option id, stable, and each option's first position), so the sums need no atomics
and come out the same on every run. Each program also writes, for each of its tokens, the flat slot
q * K + k of its option (the backward gathers the options' gradients through it).

K = max(num_options) sizes the outputs, so the launcher reads it on the host: one synchronization on a
GPU, which also brings back the layout's checks (computed on the device first); nothing else waits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._params import ChoiceLogprobsParams
from .._validation import check_option_layout
from ._launch import next_pow2


def _layout(option_ids: torch.Tensor, num_options: torch.Tensor):
    """The CSR layout on the device and, in ONE host read, (K, O, the most tokens of an option, whether the layout
    is bad): num_options >= 1, ids in [0, O), every option with a token (the details: check_option_layout)."""
    N = option_ids.numel()
    num_opts = num_options.sum()
    # tokens per option, O <= N for a valid layout (each option has a token): ids past N are bad anyway
    counts = torch.zeros(N + 1, dtype=torch.int64, device=option_ids.device)
    counts.index_add_(0, option_ids.clamp(0, N), torch.ones_like(option_ids))
    slots = torch.arange(N + 1, device=option_ids.device)
    empty = ((counts == 0) & (slots < num_opts)).any()
    bad_ids = ((option_ids < 0) | (option_ids >= num_opts)).any() if N else num_opts.new_zeros((), dtype=torch.bool)
    bad = (num_options < 1).any() | bad_ids | empty | (num_opts > N)
    summary = torch.stack([num_options.max(), num_opts, counts.max(), bad.to(torch.int64)]).tolist()
    return counts, summary


@triton.jit
def option_scores_kernel(
    token_logp_ptr, token_order_ptr, option_token_start_ptr, question_start_ptr,
    option_logp_ptr, probs_ptr, option_slot_ptr,
    max_options, max_tokens, clamp_lo, clamp_hi,
    HAS_CLAMP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    first = tl.load(question_start_ptr + q)
    count = tl.load(question_start_ptr + q + 1) - first
    k = tl.arange(0, BLOCK_K)
    real = k < count
    option = first + k
    token_begin = tl.load(option_token_start_ptr + option, mask=real, other=0)
    token_end = tl.load(option_token_start_ptr + option + 1, mask=real, other=0)
    acc_dtype = option_logp_ptr.dtype.element_ty  # fp32, or fp64 for fp64 inputs

    total = tl.zeros((BLOCK_K,), acc_dtype)
    for j in range(0, max_tokens):
        position = token_begin + j
        has_token = real & (position < token_end)
        token = tl.load(token_order_ptr + position, mask=has_token, other=0)
        total += tl.load(token_logp_ptr + token, mask=has_token, other=0.0).to(acc_dtype)
        tl.store(option_slot_ptr + token, q * max_options + k, mask=has_token)

    scores = tl.where(real, total, float("-inf"))
    m = tl.max(scores, axis=0)
    e = tl.where(real, tl.exp(scores - m), 0.0)  # every option -inf: -inf - -inf = NaN, as torch.softmax
    p = e / tl.sum(e, axis=0)
    has_nan = tl.sum(tl.where(real & (scores != scores), 1, 0), axis=0) > 0
    p = tl.where(has_nan, float("nan"), p)  # the max above may skip NaN: propagate it explicitly
    if HAS_CLAMP:
        p = tl.where(p < clamp_lo, clamp_lo, tl.where(p > clamp_hi, clamp_hi, p))  # NaN stays NaN
    p = tl.where(real, p, 0.0)
    row = q * max_options
    in_row = k < max_options
    tl.store(option_logp_ptr + row + k, scores.to(option_logp_ptr.dtype.element_ty), mask=in_row)
    tl.store(probs_ptr + row + k, p.to(probs_ptr.dtype.element_ty), mask=in_row)


def option_scores(token_logprobs: torch.Tensor, option_ids: torch.Tensor, num_options: torch.Tensor,
                  params: ChoiceLogprobsParams):
    """Same contract as the C++ kernel (csrc/cpu/choice_logprobs.cpp), checks included: every question has
    >= 1 option, every id lies in [0, O), every option has >= 1 token (else ValueError)."""
    has_clamp = params.clamp_lo is not None
    clamp_lo, clamp_hi = (params.clamp_lo, params.clamp_hi) if has_clamp else (0.0, 1.0)
    device = token_logprobs.device
    num_questions = num_options.numel()
    if num_questions == 0:
        if option_ids.numel():
            check_option_layout(option_ids, num_options)
        empty = torch.empty(0, 0, dtype=token_logprobs.dtype, device=device)
        return empty, torch.empty_like(empty), torch.empty_like(option_ids)
    counts, (max_options, num_opts, max_tokens, bad) = _layout(option_ids, num_options)
    if bad:
        check_option_layout(option_ids, num_options)  # raises, naming the first problem
    option_logprobs = torch.empty(num_questions, max_options, dtype=token_logprobs.dtype, device=device)
    probs = torch.empty_like(option_logprobs)
    option_slot = torch.empty_like(option_ids)
    option_token_start = torch.nn.functional.pad(torch.cumsum(counts[:num_opts], 0), (1, 0))  # [0, c0, c0 + c1, ...]
    question_start = torch.nn.functional.pad(torch.cumsum(num_options, 0), (1, 0))
    token_order = torch.argsort(option_ids, stable=True)
    option_scores_kernel[(num_questions,)](
        token_logprobs, token_order, option_token_start, question_start, option_logprobs, probs, option_slot,
        max_options, max_tokens, clamp_lo, clamp_hi,
        HAS_CLAMP=has_clamp, BLOCK_K=max(16, next_pow2(max_options)),
    )
    return option_logprobs, probs, option_slot


def _aot_specs():
    from ._aot import AotSpec

    return [AotSpec(
        "option_scores_kernel",
        {"token_logp_ptr": "*fp32", "token_order_ptr": "*i64", "option_token_start_ptr": "*i64",
         "question_start_ptr": "*i64", "option_logp_ptr": "*fp32", "probs_ptr": "*fp32", "option_slot_ptr": "*i64",
         "clamp_lo": "fp32", "clamp_hi": "fp32"},
        {"HAS_CLAMP": True, "BLOCK_K": 16},
        aligned=("token_logp_ptr", "token_order_ptr", "option_token_start_ptr", "question_start_ptr",
                 "option_logp_ptr", "probs_ptr", "option_slot_ptr"),
        # not memory-bound: a handful of scattered token reads per question (gathers through the CSR
        # order), no contiguous stream that 128-bit loads could serve
        wide_loads=False, label="fp32+clamp")]


AOT_SPECS = _aot_specs()
