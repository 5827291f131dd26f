"""token_logprobs: every compiled backend against the float64 reference; bad input."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import token_logprobs as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = compiled_backends("token_logprobs", DEVICE)


def random_logits(*shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def reference_f64(logits, targets, **kwargs):
    """The reference on the very values the kernel saw (rounded to its dtype), in float64."""
    return reference(logits.detach().double(), targets, **kwargs)


def check_forward_backward(logits, targets, backend, *, temperature=1.0, ignore_index=None, entropy_weight=0.37):
    """Forward (log-probs + entropy) and the gradient of a weighted sum, each against the reference."""
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=True)
    leaf = logits.detach().requires_grad_()
    logp, entropy = cai_kernels.token_logprobs(leaf, targets, backend=backend, **kwargs)
    assert logp.dtype == entropy.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert logp.shape == entropy.shape == targets.shape

    ref_leaf = logits.detach().double().requires_grad_()
    ref_logp, ref_entropy = reference(ref_leaf, targets, **kwargs)
    assert_close(logp, ref_logp, msg="log-probs")
    assert_close(entropy, ref_entropy, msg="entropy")

    weights = torch.rand_like(ref_logp)
    (logp * weights.to(logp.dtype)).sum().add((entropy * entropy_weight).sum()).backward()
    (ref_logp * weights).sum().add((ref_entropy * entropy_weight).sum()).backward()
    assert leaf.grad.dtype == logits.dtype
    assert_close(leaf.grad, ref_leaf.grad, **grad_tolerance(logits.dtype), msg="gradient")
    return logp, entropy, leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_reference_vocab_not_a_block_multiple(backend, dtype):
    logits = random_logits(3, 49157, dtype=dtype)
    targets = torch.randint(0, 49157, (3,), device=DEVICE)
    check_forward_backward(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 33, 4095, 4097, 8193])
def test_odd_vocab_sizes_and_chunk_edges(backend, vocab):
    logits = random_logits(4, vocab)
    targets = torch.randint(0, vocab, (4,), device=DEVICE)
    check_forward_backward(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_ignore_index(backend):
    logits = random_logits(2, 9, 301)
    targets = torch.randint(0, 301, (2, 9), device=DEVICE)
    targets[0, 3] = targets[1, 0] = -100
    logp, entropy, grad = check_forward_backward(logits, targets, backend, temperature=0.6, ignore_index=-100)
    assert logp[0, 3] == 0 and entropy[1, 0] == 0
    assert torch.all(grad[0, 3] == 0) and torch.all(grad[1, 0] == 0), "ignored positions must get zero gradient"
    assert torch.all(logp[targets != -100] < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_may_be_a_valid_class_id(backend):
    logits = random_logits(6, 50)
    targets = torch.tensor([0, 3, 7, 3, 9, 3], device=DEVICE)
    logp = cai_kernels.token_logprobs(logits, targets, ignore_index=3, backend=backend)
    assert torch.all(logp[targets == 3] == 0) and torch.all(logp[targets != 3] < 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["time_slice", "transpose", "column_stride", "expanded", "three_strides"])
def test_non_contiguous_views(backend, view):
    base = random_logits(3, 8, 517)
    if view == "time_slice":
        logits = base[:, :-1]                      # what a causal LM hands over: shift by one
    elif view == "transpose":
        logits = base.transpose(0, 1)              # (T, B, V) view of (B, T, V)
    elif view == "column_stride":
        logits = random_logits(517, 5).t()         # stride(-1) != 1: the one case that is copied
    elif view == "expanded":
        logits = base[:1, :4].expand(3, 4, 517)    # stride 0
    else:
        logits = random_logits(2, 3, 4, 6, 517)[:, :, 1:, ::2]  # needs three leading strides
    targets = torch.randint(0, 517, logits.shape[:-1], device=DEVICE)
    check_forward_backward(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
    logits = random_logits(4, 300)
    logits[:, :120] = -math.inf                    # a masked-out part of the vocabulary
    logits[2, 200:] = -math.inf
    targets = torch.tensor([130, 150, 170, 250], device=DEVICE)
    logp, entropy, grad = check_forward_backward(logits, targets, backend)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, :120] == 0), "a -inf logit has probability 0 and gets no gradient"
    masked_target = cai_kernels.token_logprobs(logits, torch.tensor([5, 150, 7, 250], device=DEVICE),
                                               backend=backend)
    assert masked_target[0] == -math.inf and masked_target[2] == -math.inf
    assert torch.isfinite(masked_target[[1, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_only_its_row(backend):
    logits = random_logits(3, 5000)
    logits[1, 4321] = math.nan
    targets = torch.tensor([1, 2, 3], device=DEVICE)
    logp, entropy = cai_kernels.token_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_scalar_target(backend):
    logits = random_logits(77)
    target = torch.tensor(5, device=DEVICE)
    logp = cai_kernels.token_logprobs(logits, target, backend=backend)
    assert logp.shape == ()
    assert_close(logp, reference_f64(logits, target))
    check_forward_backward(random_logits(1, 1, 77), torch.tensor([[3]], device=DEVICE), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = random_logits(0, 11)
    logp = cai_kernels.token_logprobs(logits, torch.empty(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert logp.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_at_target_is_rounded_once(backend):
    # p(target) ~ 0.9958: the gradient there is p - 1 ~ -0.0042. Rounding -p to bf16 first (steps of
    # 2^-8 near 1) and adding 1 afterwards is 7 % off; one rounding of the fp32 value is within one
    # bf16 step (0.73 % here; Triton's interpreter truncates instead of rounding to nearest).
    logits = torch.zeros(2, 256, device=DEVICE)
    logits[:, 7] = 11.0
    logits = logits.bfloat16().requires_grad_()
    targets = torch.tensor([7, 7], device=DEVICE)
    (-cai_kernels.token_logprobs(logits, targets, backend=backend)).sum().backward()
    ref_leaf = logits.detach().double().requires_grad_()
    (-reference(ref_leaf, targets)).sum().backward()
    expected = ref_leaf.grad[:, 7]
    assert torch.all((logits.grad[:, 7].double() - expected).abs() <= 0.01 * expected.abs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 2, 19, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 19, (3, 2), device=DEVICE)
    targets[1, 1] = -1

    def both_outputs(x):
        return cai_kernels.token_logprobs(x, targets, temperature=0.7, ignore_index=-1, return_entropy=True,
                                          backend=backend)

    # the interpreter runs each Triton program in Python: random projections instead of the full Jacobian
    assert torch.autograd.gradcheck(both_outputs, (logits,), fast_mode=backend == "triton" and DEVICE.type == "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_2_pow_31(backend):
    # Two rows, the second starting 2^31 + 64 elements into a bf16 buffer: 32-bit offsets would wrap.
    # torch.empty leaves the gap untouched, so only the two rows' pages are ever materialised.
    vocab, gap = 64, 2**31 + 64
    storage = torch.empty(gap + vocab, dtype=torch.bfloat16, device=DEVICE)
    logits = storage.as_strided((2, vocab), (gap, 1))
    logits.copy_(random_logits(2, vocab, dtype=torch.bfloat16))
    targets = torch.tensor([3, 60], device=DEVICE)
    assert_close(cai_kernels.token_logprobs(logits, targets, backend=backend), reference_f64(logits, targets))


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.integers(1, 700),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    temperature=st.floats(0.05, 5.0),
    scale=st.floats(0.0, 30.0),
    use_ignore=st.booleans(),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(lead, vocab, dtype, temperature, scale, use_ignore, backend):
    logits = random_logits(*lead, vocab, dtype=dtype, scale=scale)
    targets = torch.randint(0, vocab, tuple(lead), device=DEVICE)
    ignore_index = None
    if use_ignore and targets.numel():
        ignore_index = -100
        targets.view(-1)[0] = -100
    logp, entropy = cai_kernels.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                               return_entropy=True, backend=backend)
    ref_logp, ref_entropy = reference_f64(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                          return_entropy=True)
    # scores reach |z| ~ 30 / 0.05: fp32 rounding of z is relative to that magnitude
    tol = 4e-6 * (1 + scale / temperature)
    assert_close(logp, ref_logp, rtol=tol, atol=tol)
    assert_close(entropy, ref_entropy, rtol=tol, atol=tol)


# ---- the Triton backend's split of long rows over several programs (few rows: fill the GPU) ---------------

from cai_kernels.triton import token_logprobs as triton_kernels  # noqa: E402


@pytest.fixture
def split(monkeypatch):
    """Force the Triton kernels to split every row into ``pieces`` programs of ``block``-wide steps, so
    that small rows cross piece, block and vocabulary edges; ``prefetch`` False: one block in flight."""

    def set_split(pieces, block=32, prefetch=True):
        monkeypatch.setattr(triton_kernels, "FORCE_PIECES", pieces)
        monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", block)
        monkeypatch.setattr(triton_kernels, "PREFETCH", prefetch)

    return set_split


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("vocab,pieces", [(301, 2), (301, 3), (1000, 7), (97, 4), (33, 5)])
def test_split_rows_match_reference(dtype, vocab, pieces, split):
    # V = 301 = 9 * 32 + 13: pieces of 4 and 5 blocks, the last ragged; 1000 / 32 = 31.25 blocks in 7
    # pieces; 33 = 1 block + 1 entry in at most 2 pieces (capped at the block count)
    split(pieces)
    logits = random_logits(2, 5, vocab, dtype=dtype)
    targets = torch.randint(0, vocab, (2, 5), device=DEVICE)
    targets[0, 0], targets[1, 4] = 0, vocab - 1       # the first and the last column
    targets[1, 1] = -100
    logp, entropy, grad = check_forward_backward(logits, targets, "triton", temperature=0.7, ignore_index=-100)
    assert logp[1, 1] == 0 and entropy[1, 1] == 0 and torch.all(grad[1, 1] == 0)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "one-block"])
@pytest.mark.parametrize("pieces", [1, 3])
def test_both_loop_forms_split_or_not(prefetch, pieces, split):
    split(pieces, block=16, prefetch=prefetch)
    logits = random_logits(3, 4, 203)
    targets = torch.randint(0, 203, (3, 4), device=DEVICE)
    check_forward_backward(logits, targets, "triton", temperature=1.3)


def test_split_and_unsplit_agree(split):
    logits = random_logits(6, 777, dtype=torch.bfloat16)
    targets = torch.randint(0, 777, (6,), device=DEVICE)
    split(1)
    whole = cai_kernels.token_logprobs(logits, targets, return_entropy=True, backend="triton")
    split(5)
    pieces = cai_kernels.token_logprobs(logits, targets, return_entropy=True, backend="triton")
    for a, b in zip(whole, pieces):
        assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("pieces", [2, 4])
def test_split_rows_with_minus_inf_nan_and_inf(pieces, split):
    split(pieces)
    logits = random_logits(6, 300)
    logits[0, :200] = -math.inf       # whole pieces of -inf: (m, s, w) = (-inf, 0, 0) must merge to nothing
    logits[1, :] = -math.inf          # a row of -inf: NaN, as log_softmax
    logits[2, 250] = math.nan         # NaN in one piece poisons its row only
    logits[3, 17] = math.inf          # +inf: NaN, as log_softmax
    logits[4, 100:] = -math.inf       # -inf from the second piece on
    targets = torch.tensor([250, 3, 5, 40, 50, 299], device=DEVICE)
    logp, entropy = cai_kernels.token_logprobs(logits, targets, return_entropy=True, backend="triton")
    ref_logp, ref_entropy = reference_f64(logits, targets, return_entropy=True)
    assert_close(logp, ref_logp, msg="log-probs")       # NaN must match NaN, infinities exactly
    assert_close(entropy, ref_entropy, msg="entropy")
    assert torch.isnan(logp[[1, 2, 3]]).all() and torch.isfinite(logp[[0, 4, 5]]).all()
    # and the gradient where the row is finite
    finite = [0, 4, 5]
    _, _, grad = check_forward_backward(logits[finite], targets[finite], "triton")
    assert torch.all(grad[0, :200] == 0) and torch.all(grad[1, 100:] == 0)


def test_split_gradcheck_float64(split):
    split(3, block=16)
    logits = torch.randn(2, 2, 37, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 37, (2, 2), device=DEVICE)
    targets[1, 1] = -1

    def both_outputs(x):
        return cai_kernels.token_logprobs(x, targets, temperature=0.7, ignore_index=-1, return_entropy=True,
                                          backend="triton")

    # the interpreter runs each Triton program in Python: random projections instead of the full Jacobian
    assert torch.autograd.gradcheck(both_outputs, (logits,), fast_mode=DEVICE.type == "cpu")


def test_split_non_contiguous_views(split):
    split(3)
    base = random_logits(2, 4, 300, dtype=torch.bfloat16)
    for logits in (base[:, :-1], base.transpose(0, 1)):
        targets = torch.randint(0, 300, logits.shape[:-1], device=DEVICE)
        check_forward_backward(logits, targets, "triton", temperature=0.9)


def test_split_offsets_beyond_2_pow_31(split):
    # as test_offsets_beyond_2_pow_31, through the split kernels: 4 blocks of 16 in 2 pieces, forward and
    # backward (the backward re-reads the row at its 64-bit offset)
    split(2, block=16)
    vocab, gap = 64, 2**31 + 64
    storage = torch.empty(gap + vocab, dtype=torch.bfloat16, device=DEVICE)
    logits = storage.as_strided((2, vocab), (gap, 1))
    logits.copy_(random_logits(2, vocab, dtype=torch.bfloat16))
    targets = torch.tensor([3, 60], device=DEVICE)
    check_forward_backward(logits, targets, "triton", temperature=0.8)


@pytest.mark.parametrize("rows,vocab,pieces", [(130, 64, 2), (9, 600, 40)], ids=["2-pieces-2-merge-programs",
                                                                               "capped-at-32-pieces"])
def test_split_merge_tiles(rows, vocab, pieces, split):
    # 130 rows of 2 pieces: merge tiles of 128 rows, the second ragged; 600 / 16 = 38 blocks, 40 pieces asked:
    # MAX_PIECES = 32, one merge tile of 32 pieces x 32 rows, 9 of them used
    split(pieces, block=16)
    expected = min(pieces, triton_kernels.MAX_PIECES)
    assert triton_kernels.split_pieces(rows, vocab, 16, 2, 132) == expected
    assert rows % triton_kernels.merge_blocks(expected)[1] != 0
    logits = random_logits(rows, vocab, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[::7] = -100
    check_forward_backward(logits, targets, "triton", temperature=1.1, ignore_index=-100)


def test_split_is_deterministic(split):
    # fixed-order merge, no atomics: two calls agree bit for bit
    split(4)
    logits = random_logits(5, 999, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 999, (5,), device=DEVICE)
    runs = []
    for _ in range(2):
        logits.grad = None
        logp, entropy = cai_kernels.token_logprobs(logits, targets, return_entropy=True, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        runs.append((logp.detach(), entropy.detach(), logits.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_split_rule():
    """The launcher's rule (triton/token_logprobs.py): split only when the one-program-per-row grid
    leaves most of its last wave empty and the merge costs less than that; pieces span >= 2 blocks."""
    pieces = triton_kernels.split_pieces
    sms, block = 132, 4096
    slots = sms * triton_kernels.RESIDENT_PROGRAMS_PER_SM
    for element in (2, 4):
        # many rows: one program per row (several full waves)
        for rows in (4096, 8192, 16384, 32768):
            assert pieces(rows, 49152, block, element, sms) == 1
            assert pieces(rows, 49152, block, element, sms, backward=True) == 1
        # few rows: a split fills the SMs that one program per row leaves idle
        for rows in (64, 128, 256):
            p = pieces(rows, 151936, block, element, sms)
            assert p > 1 and rows * p >= slots // 2, (rows, p)
    # every piece spans at least MIN_BLOCKS_PER_PIECE blocks: a row of 3 blocks is never split
    assert pieces(8, 3 * block, block, 2, sms) == 1
    assert pieces(8, 2 * block * 5, block, 2, sms) <= 5
    # the choice is the minimum of the model when that saves MIN_SPLIT_GAIN, else one program per row
    model = triton_kernels.modeled_seconds
    gain = triton_kernels.MIN_SPLIT_GAIN
    for vocab in (49152, 151936):
        for rows in (1, 16, 100, 300, 500, 1000, 1500, 3000):
            p = pieces(rows, vocab, block, 2, sms)
            times = {q: model(rows, vocab, 2, q, sms) for q in range(1, -(-vocab // block) // 2 + 1)}
            best = min(times.values())
            if p == 1:
                assert best > (1 - gain) * times[1], (vocab, rows)
            else:
                assert times[p] == best and times[p] <= (1 - gain) * times[1], (vocab, rows, p)
    # never more than MAX_PIECES, however long the row and few the rows
    assert pieces(1, 2**20, block, 2, sms) == triton_kernels.MAX_PIECES


def test_split_rule_reads_the_sm_count_from_the_device():
    count = triton_kernels.sm_count(torch.device("cpu"))
    assert count == triton_kernels.CPU_SMS
    if torch.cuda.is_available():
        assert triton_kernels.sm_count(DEVICE) == torch.cuda.get_device_properties(DEVICE).multi_processor_count


def test_backends_agree_with_each_other():
    logits = random_logits(5, 7, 1234, dtype=torch.bfloat16)
    targets = torch.randint(0, 1234, (5, 7), device=DEVICE)
    outs = [cai_kernels.token_logprobs(logits, targets, backend=p.values[0]) for p in BACKENDS]
    for out in outs[1:]:
        assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


@pytest.fixture
def logits():
    return torch.randn(2, 3, 11, device=DEVICE)


@pytest.fixture
def targets():
    return torch.randint(0, 11, (2, 3), device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_value", [11, -1, 10**12])
def test_target_out_of_range_is_a_value_error(backend, logits, targets, bad_value):
    targets[1, 2] = bad_value
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.token_logprobs(logits, targets, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_other_than_ignore_index_still_caught(backend, logits, targets):
    targets[0, 0] = -100
    targets[1, 1] = 11
    with pytest.raises(ValueError, match="targets"):
        cai_kernels.token_logprobs(logits, targets, ignore_index=-100, backend=backend)


def test_targets_dtype_is_a_type_error(logits, targets):
    with pytest.raises(TypeError, match=r"targets must be int64 with shape \(2, 3\).*torch.int32"):
        cai_kernels.token_logprobs(logits, targets.int())


def test_targets_shape_mismatch(logits):
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        cai_kernels.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE))


def test_logits_must_be_floating(targets):
    with pytest.raises(TypeError, match="logits must have dtype"):
        cai_kernels.token_logprobs(torch.zeros(2, 3, 11, dtype=torch.long, device=DEVICE), targets)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        cai_kernels.token_logprobs([[0.0]], targets)


def test_empty_vocabulary(targets):
    with pytest.raises(ValueError, match="non-empty last"):
        cai_kernels.token_logprobs(torch.zeros(2, 3, 0, device=DEVICE), targets)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive_and_finite(logits, targets, temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cai_kernels.token_logprobs(logits, targets, temperature=temperature)


def test_temperature_type(logits, targets):
    with pytest.raises(TypeError, match="temperature must be a number"):
        cai_kernels.token_logprobs(logits, targets, temperature="hot")


def test_ignore_index_type(logits, targets):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cai_kernels.token_logprobs(logits, targets, ignore_index=1.5)


def test_devices_must_match(logits, targets):
    with pytest.raises(ValueError, match="targets must be on the same device as logits"):
        cai_kernels.token_logprobs(logits, targets.to("meta"))


def test_unknown_backend(logits, targets):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.token_logprobs(logits, targets, backend="fortran")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU runs the script itself (benchmarks/gpu.sh token-logprobs)")
def test_gpu_script_runs_end_to_end_on_the_interpreter(tmp_path):
    # benchmarks/token_logprobs_gpu.py (the split's GPU check) at tiny shapes: every forced pieces count is
    # checked against the reference and timed, and the summary carries the acceptance line
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-m", "benchmarks.token_logprobs_gpu", "--dry-run", "--out", str(tmp_path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== token_logprobs split: summary" in run.stdout and "acceptance (issue 10)" in run.stdout
    report = json.loads((tmp_path / "token-logprobs-split-dry-run.json").read_text())
    assert {case["pieces"] for case in report["correctness"]} == {"rule", 1, 2, 4}
    assert all(case["ok"] for case in report["correctness"])
    variants = {row["variant"] for row in report["forward"]}
    assert {"op", "op, no check", "pieces=1", "pieces=2", "pieces=4", "pieces=1 1-block", "torch.compile",
            "eager"} <= variants
    assert {row["variant"] for row in report["fwd_bwd"]} == {"op fwd+bwd", "torch.compile fwd+bwd"}
