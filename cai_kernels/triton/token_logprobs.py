"""Triton kernels of token_logprobs: per-token log-probs and entropy, forward and backward.

Rows of a (outer, inner, V) logits view (see ``cai_kernels/ops/_layout.py``) are streamed in blocks of
BLOCK_V with an online log-sum-exp (``_online_lse.py``), so nothing of size V is kept. Each program
keeps two blocks in flight (PREFETCH: the next block's load is issued before the current block's
reductions), so that its memory latency overlaps its own arithmetic and barriers.

Grid. One program per row, or, when there are too few rows to fill the GPU, ``pieces`` programs per
row, each over a contiguous run of the row's blocks (``split_pieces`` decides, from the rows, V, the
dtype and the SM count read off the device):
  forward   token_logprobs_fwd_kernel with SPLIT stores per (piece, row) partials (m, s, w) of the
            online log-sum-exp (12 bytes); token_logprobs_merge_kernel merges each row's pieces (all
            at once, a fixed-order reduction: deterministic) and reads the target's logit. Two
            launches instead of one.
  backward  token_logprobs_bwd_kernel over (row, piece): the gradient is elementwise given the saved
            lse (and entropy), so pieces need no merge.

The split rule (``split_pieces``), from METHOD.md's two numbers. The kernel is memory-bound (a few
FLOPs and one exp per element): its floor is bytes / bandwidth. A full wave of SLOTS = SMs x
RESIDENT_PROGRAMS_PER_SM programs reaches it (each with two blocks in flight: SLOTS x 16 KB = 8.4 MB
on an H200, twice the bandwidth x latency product of 4.3 TB/s x ~1 us), each program streaming at
BW / SLOTS; programs are equally long, so a grid of rows x pieces programs runs in ceil(rows pieces /
SLOTS) waves, each as long as one program:
    t(pieces) = ceil(rows pieces / SLOTS) (V e / pieces x SLOTS / BW + PROGRAM_START_SECONDS)
                [+ MERGE_SECONDS + rows pieces 12 B / BW: the merge of a split forward]
PROGRAM_START_SECONDS is a program's first memory round trip (its target, its first block), which
nothing of its own overlaps. The launcher takes the pieces in 1 .. min(MAX_PIECES, blocks /
MIN_BLOCKS_PER_PIECE) that minimize t (the fewest on a tie), and keeps one program per row unless that
saves MIN_SPLIT_GAIN (10 %) of the modeled time: the model is a lead, and a split costs a second launch.
In effect (H200, 132 SMs x 4 = 528 slots, bf16 or fp32): split when rows < about one wave (~500 rows;
the exact edge moves with the last wave's fill) and the row has >= 4 blocks (V > 12288), into more
pieces the fewer the rows and the longer the row: V = 49152 at 1-64 rows: 6 pieces, 128 rows: 4;
V = 151936 at 1-8 rows: 19, 64 rows: 8, 128: 4, 256: 2; from ~512 rows up one program per row.

Why not at 4096-8192 rows, where the 2026-11-25 H200 run has bf16 at 0.64x / 0.90x torch.compile:
there the unsplit grid already runs 8-16 waves (a split only trims the last wave's idle slots, < 15 %),
and that run's own numbers put the loss elsewhere. Its bf16 V = 49152 times (0.347, 0.424, 0.615 ms at
4096, 8192, 16384 rows) fit t = 0.23 ms + rows x 98 KB / 4.2 TB/s, torch.compile's (0.220, 0.381,
0.709 ms) t = 0.05 ms + rows x 98 KB / 2.5 TB/s: per row ours is the faster, and what it loses is a
fixed ~0.18 ms more per call (fp32: ours 0.13 ms + rows x 197 KB / 4.5 TB/s). A split adds a launch
to that fixed part; what should remove it is the host path (that run's launcher had a data-dependent
sync, a host-side target-range check that read the targets back before the launch, so the GPU idled
through the host work that followed; the check now runs on the device) and, for bf16, more bytes in flight per program (PREFETCH). A hypothesis
until measured. The constants are leads (AOT register
report: 40-56 registers x 256 threads, 4-6 programs per SM; KINDS.md's copy bandwidth);
``benchmarks/token_logprobs_gpu.py`` (``bash benchmarks/gpu.sh token-logprobs``) times the public op,
the bare kernels at every forced pieces count, with and without PREFETCH, at 64-16384 rows against
torch.compile and eager, and prints what the rule picks next to the fastest, which is what should
set them.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._params import TokenLogprobsParams
from .._validation import accumulate_dtype
from ._launch import cdiv, pow2_block, row_layout
from ._online_lse import (grad_row_scalars, ignore_args, logits_grad, merge_lse_partials, num_warps,
                          online_lse_step, targets_of_rows)

MAX_BLOCK_V = 4096            # vocabulary entries per loop step (tests lower it to split small rows)
PREFETCH = True               # two blocks in flight per program (False: one, the kernel of 2026-11-25)
MIN_BLOCKS_PER_PIECE = 2      # a piece streams at least two blocks (its prefetch overlaps something)
RESIDENT_PROGRAMS_PER_SM = 4  # 256-thread programs of 40-56 registers (AOT report): 4-6 fit an SM
BANDWIDTH = 4.3e12            # bytes / s, H200 device copy (KINDS.md)
PROGRAM_START_SECONDS = 1e-6  # a program's first round trip to memory (HBM latency under load, ~1 us)
MERGE_SECONDS = 5e-6          # one more launch and the merge kernel's round trip to memory
MAX_PIECES = 32               # pieces per row at most: the merge kernel holds a row's pieces in one tile
MIN_SPLIT_GAIN = 0.10         # split only when the model saves at least this fraction (it is a lead, not a fit)
MERGE_TILE = 1024             # partials per merge program at most: 128 rows of <= 8 pieces, 32 rows of 32
FORCE_PIECES: int | None = None  # tests / benchmarks: split every row into this many pieces (capped, see below)
CPU_SMS = 1                   # the SM count assumed for CPU tensors (Triton's interpreter)


@triton.jit
def row_piece(V, pieces, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr):
    """(row, piece, begin, end) of this program (program id = row * pieces + piece): the piece's columns are
    blocks [piece B // pieces, (piece + 1) B // pieces) of the row's B blocks, so that every piece starts on
    a block boundary (aligned loads); without SPLIT the whole row [0, V)."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows * V may exceed 2^31
    piece = row * 0
    begin = 0
    end = V
    if SPLIT:
        piece = row % pieces  # 64-bit: piece * blocks is computed before the division
        row = row // pieces
        blocks = (V + BLOCK_V - 1) // BLOCK_V
        begin = (((piece * blocks) // pieces) * BLOCK_V).to(tl.int32)  # columns stay 32-bit (V < 2^31)
        end = tl.minimum((((piece + 1) * blocks) // pieces) * BLOCK_V, V).to(tl.int32)
    return row, piece, begin, end


@triton.jit
def first_block(row_ptr, begin, read_end, PREFETCH: tl.constexpr, BLOCK_V: tl.constexpr):
    """With PREFETCH the load of the piece's first block, issued before the loop; else a placeholder."""
    cols = begin + tl.arange(0, BLOCK_V)
    if PREFETCH:
        ahead = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf"))
    else:
        ahead = tl.full([BLOCK_V], float("-inf"), row_ptr.dtype.element_ty)
    return ahead


@triton.jit
def next_block(row_ptr, cols, read_end, ahead, PREFETCH: tl.constexpr, BLOCK_V: tl.constexpr):
    """(the block at ``cols``, what is in flight next). With PREFETCH the next block's load goes out before
    this block's reductions (masked off past the end): two blocks in flight per program."""
    if PREFETCH:
        x = ahead
        following = cols + BLOCK_V
        ahead = tl.load(row_ptr + following, mask=following < read_end, other=float("-inf"))
    else:
        x = tl.load(row_ptr + cols, mask=cols < read_end, other=float("-inf"))
    return x, ahead


@triton.jit(do_not_specialize=["pieces"])
def token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, part_ptr,
    n_rows, inner, stride_outer, stride_inner, V, pieces,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One (row, piece): program id = row * pieces + piece. Without SPLIT (pieces == 1) the row's
    logp, entropy and lse; with SPLIT the piece's partial (m, s, w) into part (3, pieces, n_rows)."""
    row, piece, begin, end = row_piece(V, pieces, SPLIT, BLOCK_V)
    target = tl.load(targets_ptr + row)
    active = target == target  # every row, unless it is ignored
    if HAS_IGNORE:
        active = target != ignore_index
    # a target outside [0, V) (and not ignore_index) is bad data checked here, on the device: NaN, no read
    in_range = (target >= 0) & (target < V)
    read_end = tl.where(active, end, begin)  # an ignored row reads nothing
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    acc_dtype = lse_ptr.dtype.element_ty  # fp32, or fp64 for fp64 logits

    m = tl.full((), float("-inf"), acc_dtype)  # running max of z
    s = tl.zeros((), acc_dtype)                 # sum exp(z - m)
    w = tl.zeros((), acc_dtype)                 # sum exp(z - m) * (z - m)
    offsets = tl.arange(0, BLOCK_V)
    ahead = first_block(row_ptr, begin, read_end, PREFETCH, BLOCK_V)
    for start in range(begin, end, BLOCK_V):
        cols = start + offsets
        x, ahead = next_block(row_ptr, cols, read_end, ahead, PREFETCH, BLOCK_V)
        m, s, w = online_lse_step(m, s, w, x.to(acc_dtype) * inv_temperature, WITH_ENTROPY)

    if SPLIT:
        out = part_ptr + piece * n_rows + row
        plane = pieces.to(tl.int64) * n_rows
        tl.store(out, m)
        tl.store(out + plane, s)
        if WITH_ENTROPY:
            tl.store(out + 2 * plane, w)
    else:
        readable = active & in_range
        safe_target = tl.where(readable, target, 0)
        z_target = tl.load(row_ptr + safe_target, mask=readable, other=0.0).to(acc_dtype) * inv_temperature
        lse = m + tl.log(s)
        logp = tl.where(in_range, z_target - lse, float("nan"))
        tl.store(logp_ptr + row, tl.where(active, logp, 0.0))
        tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(active, tl.log(s) - w / s, 0.0))


@triton.jit(do_not_specialize=["pieces"])
def token_logprobs_merge_kernel(
    part_ptr, logits_ptr, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
    n_rows, inner, stride_outer, stride_inner, V, pieces,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """BLOCK_R rows: merge their pieces' partials (part (3, pieces, n_rows), pieces <= BLOCK_P) and
    write logp, entropy, lse as the unsplit kernel does (0 on ignored rows)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows, target, active, in_range = targets_of_rows(targets_ptr, rows, n_rows, V, ignore_index, HAS_IGNORE)
    acc_dtype = lse_ptr.dtype.element_ty

    p = tl.arange(0, BLOCK_P)
    at = part_ptr + p[:, None].to(tl.int64) * n_rows + rows[None, :]
    mask = (p < pieces)[:, None] & in_rows[None, :]
    plane = pieces.to(tl.int64) * n_rows
    m_p = tl.load(at, mask=mask, other=float("-inf"))
    s_p = tl.load(at + plane, mask=mask, other=0.0)
    w_p = s_p
    if WITH_ENTROPY:
        w_p = tl.load(at + 2 * plane, mask=mask, other=0.0)
    m, s, w = merge_lse_partials(m_p, s_p, w_p, WITH_ENTROPY)

    readable = active & in_range
    safe_target = tl.where(readable, target, 0)
    safe_rows = tl.where(in_rows, rows, 0)
    row_ptr = logits_ptr + (safe_rows // inner) * stride_outer + (safe_rows % inner) * stride_inner
    z_target = tl.load(row_ptr + safe_target, mask=readable, other=0.0).to(acc_dtype) * inv_temperature
    lse = m + tl.log(s)
    logp = tl.where(in_range, z_target - lse, float("nan"))
    tl.store(logp_ptr + rows, tl.where(active, logp, 0.0), mask=in_rows)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=in_rows)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(active, tl.log(s) - w / s, 0.0), mask=in_rows)


@triton.jit(do_not_specialize=["pieces"])
def token_logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_ptr,
    inner, stride_outer, stride_inner, V, pieces,
    inv_temperature, ignore_index,
    HAS_IGNORE: tl.constexpr, WITH_ENTROPY: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One (row, piece), program id = row * pieces + piece (SPLIT; else one row, pieces == 1): the
    gradient of the piece's columns (elementwise given the row's saved lse and entropy: no merge)."""
    row, _, begin, end = row_piece(V, pieces, SPLIT, BLOCK_V)
    target, active, g, h, lse, mu = grad_row_scalars(row, targets_ptr, grad_logp_ptr, grad_entropy_ptr, lse_ptr,
                                                     entropy_ptr, ignore_index, HAS_IGNORE, WITH_ENTROPY)
    read_end = tl.where(active, end, begin)  # an ignored row reads nothing and writes zeros
    row_ptr = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    grad_row_ptr = grad_ptr + row * V
    offsets = tl.arange(0, BLOCK_V)
    ahead = first_block(row_ptr, begin, read_end, PREFETCH, BLOCK_V)
    for start in range(begin, end, BLOCK_V):
        cols = start + offsets
        x, ahead = next_block(row_ptr, cols, read_end, ahead, PREFETCH, BLOCK_V)
        grad = logits_grad(x.to(lse.dtype) * inv_temperature, cols == target, g, h, lse, mu, inv_temperature,
                           WITH_ENTROPY)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < end)


# -- launchers ---------------------------------------------------------------------------------------


def block_v(V: int) -> int:
    """Vocabulary entries per loop step."""
    return pow2_block(V, MAX_BLOCK_V)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (read off the device, cached); CPU_SMS for CPU tensors."""
    if device.type != "cuda":
        return CPU_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def modeled_seconds(rows: int, V: int, element_size: int, pieces: int, sms: int, *, backward: bool = False) -> float:
    """The split rule's time model (module docstring): whole waves of equally long programs, each
    streaming its piece at 1 / SLOTS of the bandwidth after one round trip, plus a split forward's merge."""
    slots = sms * RESIDENT_PROGRAMS_PER_SM
    row_bytes = V * element_size * (2 if backward else 1)  # the backward also writes the gradient
    program = row_bytes / pieces * slots / BANDWIDTH + PROGRAM_START_SECONDS
    seconds = math.ceil(rows * pieces / slots) * program
    if pieces > 1 and not backward:
        seconds += MERGE_SECONDS + rows * pieces * 12 / BANDWIDTH
    return seconds


def split_pieces(rows: int, V: int, block: int, element_size: int, sms: int, *, backward: bool = False) -> int:
    """Programs per row (the split rule of the module docstring): the count in 1 .. min(MAX_PIECES,
    blocks / MIN_BLOCKS_PER_PIECE) with the least modeled time, the fewest on a tie, and 1 unless that
    saves at least MIN_SPLIT_GAIN of the unsplit time. FORCE_PIECES (tests, benchmarks) when set,
    capped at the row's block count and MAX_PIECES."""
    blocks = cdiv(V, block)  # not triton.cdiv: its constexpr wrapper costs ~2 us on the host
    if FORCE_PIECES is not None:
        return max(1, min(FORCE_PIECES, blocks, MAX_PIECES))
    most = min(blocks // MIN_BLOCKS_PER_PIECE, MAX_PIECES)
    if rows == 0 or most <= 1:
        return 1
    def model(p):
        return modeled_seconds(rows, V, element_size, p, sms, backward=backward)
    best = min(range(1, most + 1), key=model)
    return best if model(best) <= (1 - MIN_SPLIT_GAIN) * model(1) else 1


def merge_blocks(pieces: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_R, num_warps) of the merge kernel: all of a row's pieces (pieces <= MAX_PIECES) in a
    tile of at most MERGE_TILE partials and 128 rows (several programs for a few hundred rows), and at
    least four rows' partials per thread (one 16-byte load)."""
    block_p = triton.next_power_of_2(pieces)
    block_r = min(MERGE_TILE // block_p, 128)
    return block_p, block_r, max(1, min(4, block_p * block_r // 128))


def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, params: TokenLogprobsParams):
    """Same contract as the C++ kernel (csrc/cpu/token_logprobs.cpp): logits (outer, inner, V) with
    stride(2) == 1 (here also (rows, V) with a unit stride along V: ``row_layout``), targets (rows,) int64, each in [0, V) or ignore_index: checked on the device, a NaN
    log-prob for a target outside (the C++ kernel raises ValueError; the ops layer checks CPU tensors).
    Returns (logp, entropy, lse), each (rows,) fp32 (fp64 for fp64 logits); entropy empty without
    params.with_entropy."""
    n_rows = targets.numel()
    _, inner, stride_outer, stride_inner, V = row_layout(logits)
    acc = accumulate_dtype(logits.dtype)
    device = logits.device
    logp = torch.empty(n_rows, dtype=acc, device=device)
    lse = torch.empty(n_rows, dtype=acc, device=device)
    entropy = torch.empty(n_rows if params.with_entropy else 0, dtype=acc, device=device)
    if not n_rows:
        return logp, entropy, lse
    block = block_v(V)
    pieces = split_pieces(n_rows, V, block, logits.element_size(), sm_count(device))
    ignore_index, has_ignore = ignore_args(params.ignore_index)
    with_entropy = params.with_entropy
    layout = (inner, stride_outer, stride_inner)
    # (m, s[, w]) per (piece, row); unsplit: any pointer (not read)
    partials = torch.empty((3 if with_entropy else 2, pieces, n_rows), dtype=acc, device=device) if pieces > 1 else lse
    token_logprobs_fwd_kernel[(n_rows * pieces,)](
        logits, targets, logp, entropy, lse, partials,
        n_rows, *layout, V, pieces,
        1.0 / params.temperature, ignore_index,
        HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, SPLIT=pieces > 1, PREFETCH=PREFETCH, BLOCK_V=block,
        num_warps=num_warps(block),
    )
    if pieces > 1:
        block_p, block_r, warps = merge_blocks(pieces)
        token_logprobs_merge_kernel[(cdiv(n_rows, block_r),)](
            partials, logits, targets, logp, entropy, lse,
            n_rows, *layout, V, pieces,
            1.0 / params.temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, BLOCK_P=block_p, BLOCK_R=block_r, num_warps=warps,
        )
    return logp, entropy, lse


def token_logprobs_bwd(grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
                       targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                       params: TokenLogprobsParams) -> torch.Tensor:
    """Same contract as the C++ kernel: the (outer, inner, V) gradient, in the logits' dtype; the entropy
    term only with params.with_entropy."""
    n_rows = targets.numel()
    _, inner, stride_outer, stride_inner, V = row_layout(logits)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    with_entropy = params.with_entropy
    if n_rows:
        block = block_v(V)
        pieces = split_pieces(n_rows, V, block, logits.element_size(), sm_count(logits.device), backward=True)
        ignore_index, has_ignore = ignore_args(params.ignore_index)
        token_logprobs_bwd_kernel[(n_rows * pieces,)](
            grad_logp, grad_entropy if with_entropy else grad_logp, logits, targets, lse,
            entropy if with_entropy else lse, grad,
            inner, stride_outer, stride_inner, V, pieces,
            1.0 / params.temperature, ignore_index,
            HAS_IGNORE=has_ignore, WITH_ENTROPY=with_entropy, SPLIT=pieces > 1, PREFETCH=PREFETCH, BLOCK_V=block,
            num_warps=num_warps(block),
        )
    return grad


def _aot_specs():
    from ._aot import AotSpec

    specs = []
    for dtype, entropy, split, prefetch in (("bf16", True, False, True), ("fp32", False, False, True),
                                            ("fp16", False, False, True), ("bf16", True, True, True),
                                            ("fp32", True, True, True), ("bf16", True, False, False)):
        flags = {"HAS_IGNORE": True, "WITH_ENTROPY": entropy, "PREFETCH": prefetch, "BLOCK_V": 4096}
        label = (f"{dtype}{'+entropy' if entropy else ''}{'+split' if split else ''}"
                 f"{'' if prefetch else '+no_prefetch'}")
        specs.append(AotSpec(
            "token_logprobs_fwd_kernel",
            {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
             "lse_ptr": "*fp32", "part_ptr": "*fp32", "inv_temperature": "fp32"}, flags | {"SPLIT": split},
            aligned=("logits_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "part_ptr", "n_rows",
                     "stride_outer", "stride_inner", "V"),
            num_warps=num_warps(4096), label=label))
        # few bytes per row, rows on the lanes: 16-byte loads of four rows' partials; the smallest and
        # the largest tile of pieces the launcher uses
        for pieces in ((2, MAX_PIECES) if split else ()):
            block_p, block_r, warps = merge_blocks(pieces)
            specs.append(AotSpec(
                "token_logprobs_merge_kernel",
                {"part_ptr": "*fp32", "logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "logp_ptr": "*fp32",
                 "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "inv_temperature": "fp32"},
                {"HAS_IGNORE": True, "WITH_ENTROPY": entropy, "BLOCK_P": block_p, "BLOCK_R": block_r},
                aligned=("part_ptr", "logits_ptr", "targets_ptr", "logp_ptr", "entropy_ptr", "lse_ptr", "n_rows",
                         "stride_outer", "stride_inner"),
                num_warps=warps, label=f"{label}+pieces{block_p}"))
        specs.append(AotSpec(
            "token_logprobs_bwd_kernel",
            {"grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "logits_ptr": f"*{dtype}",
             "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_ptr": f"*{dtype}",
             "inv_temperature": "fp32"}, flags | {"SPLIT": split},
            aligned=("grad_logp_ptr", "grad_entropy_ptr", "logits_ptr", "targets_ptr", "lse_ptr", "entropy_ptr",
                     "grad_ptr", "stride_outer", "stride_inner", "V"),
            num_warps=num_warps(4096), label=label))
    return specs


AOT_SPECS = _aot_specs()
