"""The tensor-core fused LM head (cai_kernels/triton/linear_head.py) against the float64 reference.

The launchers are called directly (tests/test_linear_token_logprobs.py checks the op that routes bf16 /
fp16, and fp32 under TF32, to them). On this machine the
kernels run through Triton's interpreter on CPU tensors with small tiles (16 x 32 x 16, 3 vocabulary
pieces, 64-column backward chunks), so that the odd sizes below cross every tile, piece and chunk
edge; on a GPU the same tests run on CUDA with the launcher's own blocking.

Error model of the gradients: ``tests/_rounding_model.py`` (dz rounded once to the operand dtype before
the two GEMMs, fp32 accumulation, one more rounding of the result), checked element by element.
"""

import math

import pytest
import torch

from cai_kernels.reference import linear_token_logprobs as reference
from cai_kernels.reference import token_logprobs as reference_token_logprobs
from cai_kernels.triton import linear_head
from tests._backends import assert_close
from tests._rounding_model import assert_gradients_within_model, exact

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETED = DEVICE.type == "cpu"  # the kernels run through Triton's interpreter


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpu():
    """fp32 GEMMs (ours and the reference's) in exact fp32, not TF32, for these comparisons."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def make_inputs(rows, hidden_size, vocab, *, dtype=torch.float32, with_bias=True, logit_scale=3.0, lead=None):
    """hidden (rows, H) [or lead + (H,)], weight (V, H), bias (V,): logits with std ~ logit_scale."""
    shape = (lead if lead is not None else (rows,)) + (hidden_size,)
    hidden = torch.randn(*shape, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * (logit_scale / math.sqrt(hidden_size))
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def run(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=None, grad_entropy=True, need=(1, 1, 1),
        config=None, seed=0):
    """Forward (log p, entropy, lse) and backward of sum(a * log p + c * entropy) with fixed random
    a, c; returns (logp, entropy, lse, (grad_hidden, grad_weight, grad_bias), (a, c))."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    has_ignore = ignore_index is not None
    logp, entropy, lse = linear_head.linear_token_logprobs_fwd(
        hidden, weight, bias, targets.reshape(-1), 1.0 / temperature, ignore_index if has_ignore else 0, has_ignore,
        True, config=config)
    generator = torch.Generator().manual_seed(seed)
    grad_logp = torch.rand(logp.shape, generator=generator, dtype=torch.float64).to(acc).to(DEVICE)
    grad_ent = (torch.rand(logp.shape, generator=generator, dtype=torch.float64).to(acc).to(DEVICE) - 0.5
                if grad_entropy else logp.new_empty(0))
    grads = linear_head.linear_token_logprobs_bwd(
        grad_logp, grad_ent, hidden, weight, bias, targets.reshape(-1), lse, entropy, 1.0 / temperature,
        ignore_index if has_ignore else 0, has_ignore, bool(need[0]), bool(need[1]), bool(need[2]), config=config)
    return logp, entropy, lse, grads, (grad_logp, grad_ent)


def check(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=None, grad_entropy=True, config=None,
          forward_tol=None):
    """The forward and all three gradients against the float64 reference; returns the kernels' results."""
    logp, entropy, lse, grads, upstream = run(hidden, weight, bias, targets, temperature=temperature,
                                              ignore_index=ignore_index, grad_entropy=grad_entropy, config=config)
    ref_logp, ref_entropy, ref_lse, ref_grads, (dz_parts, sizes), (h, w) = exact(hidden, weight, bias, targets, upstream,
                                                                  temperature=temperature, ignore_index=ignore_index)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert logp.dtype == entropy.dtype == lse.dtype == acc
    # fp32 accumulation over H of the logits, relative to their size (and to 1/T-scaled magnitudes)
    tol = forward_tol or (1e-12 if acc == torch.float64 else 2e-6 * (1 + ref_logp.abs().max().item()))
    assert_close(logp, ref_logp.reshape(-1), rtol=tol, atol=tol, msg="log-probs")
    assert_close(entropy, ref_entropy.reshape(-1), rtol=tol, atol=tol, msg="entropy")
    assert_close(lse, ref_lse.reshape(-1), rtol=tol, atol=tol, msg="lse")

    assert_gradients_within_model(grads, ref_grads, dz_parts, sizes, h, w, hidden.dtype, interpreted=INTERPRETED)
    return logp, entropy, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("features", ["bias+entropy+temperature+ignore", "plain"])
def test_matches_reference_on_odd_shapes(dtype, features):
    # N = 37 = 2 * 16 + 5 rows, H = 40 (not a multiple of BLOCK_K = 16), V = 301 = 9 * 32 + 13 columns:
    # 3 vocabulary pieces, 5 backward chunks of 64 (the last 45 wide)
    full = features != "plain"
    hidden, weight, bias = make_inputs(37, 40, 301, dtype=dtype, with_bias=full)
    targets = torch.randint(0, 301, (37,), device=DEVICE)
    targets[[0, 36]] = torch.tensor([0, 300], device=DEVICE)  # the first and last vocabulary entries
    ignore_index = None
    if full:
        targets[[3, 17]] = -100
        ignore_index = -100
    logp, entropy, (grad_hidden, _, _) = check(hidden, weight, bias, targets, temperature=0.7 if full else 1.0,
                                               ignore_index=ignore_index, grad_entropy=full)
    if full:
        assert logp[3] == 0 and entropy[17] == 0
        assert torch.all(grad_hidden[[3, 17]] == 0), "ignored rows get zero gradient"


@pytest.mark.parametrize("shape", [(32, 32, 128), (1, 16, 1), (16, 17, 33), (50, 64, 40)],
                         ids=["all-tiles-full", "one-row-one-column", "one-past-tiles", "vocab-below-chunk"])
def test_tile_edges(shape):
    rows, hidden_size, vocab = shape
    hidden, weight, bias = make_inputs(rows, hidden_size, vocab, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    check(hidden, weight, bias, targets, temperature=1.3)


@pytest.mark.parametrize("blocking", ["one-piece-one-chunk", "many-pieces-small-chunks", "wide-tiles"])
def test_blockings_give_the_same_function(blocking):
    base = linear_head.default_config(DEVICE)
    config = {
        "one-piece-one-chunk": linear_head.with_config(base, pieces=1, vocab_chunk=512),
        "many-pieces-small-chunks": linear_head.with_config(base, pieces=64, vocab_chunk=32),
        "wide-tiles": linear_head.with_config(base, fwd=linear_head.Blocks(32, 64, 32),
                                              dlogits=linear_head.Blocks(32, 64, 32),
                                              grad=linear_head.Blocks(32, 16, 32), vocab_chunk=96),
    }[blocking]
    hidden, weight, bias = make_inputs(21, 24, 259, dtype=torch.float32)
    targets = torch.randint(0, 259, (21,), device=DEVICE)
    check(hidden, weight, bias, targets, temperature=0.9, config=config)


def test_float64_runs_in_float64():
    hidden, weight, bias = make_inputs(9, 20, 70, dtype=torch.float64)
    targets = torch.randint(0, 70, (9,), device=DEVICE)
    check(hidden, weight, bias, targets, temperature=0.6, ignore_index=int(targets[2]))


def test_bf16_logits_are_the_fp32_accumulated_gemm_not_bf16_rounded():
    """The numerics contract: log-probs of the fp32-accumulated GEMM of the bf16 operands (what cuBLAS
    gives with fp32 output), far closer to it than the log-probs of bf16-rounded logits are."""
    hidden, weight, _ = make_inputs(24, 256, 200, dtype=torch.bfloat16, logit_scale=8.0)
    targets = torch.randint(0, 200, (24,), device=DEVICE)
    logp, _, _ = linear_head.linear_token_logprobs_fwd(hidden, weight, None, targets, 1.0, 0, False, False)
    fp32_logits = torch.mm(hidden.float(), weight.float().t())  # bf16 products are exact in fp32
    from_fp32 = reference_token_logprobs(fp32_logits.double(), targets)
    from_bf16 = reference_token_logprobs(fp32_logits.to(torch.bfloat16).double(), targets)
    error = (logp.double() - from_fp32).abs().max().item()
    rounding_gap = (from_bf16 - from_fp32).abs().max().item()
    assert error < 5e-5, error
    assert rounding_gap > 100 * error, (rounding_gap, error)


@pytest.mark.parametrize("view", ["transpose", "time_slice", "column_stride", "expanded", "weight_transposed"])
def test_non_contiguous_views(view):
    hidden, weight, bias = make_inputs(None, 24, 100, dtype=torch.bfloat16, lead=(2, 5))
    if view == "transpose":
        hidden = hidden.transpose(0, 1)                          # (T, B, H) view of (B, T, H)
    elif view == "time_slice":
        hidden = hidden[:, :-1]                                  # the positions that predict a next token
    elif view == "column_stride":
        hidden = make_inputs(24, 10, 1, dtype=torch.bfloat16)[0].view(24, 2, 5).permute(1, 2, 0)  # stride(-1) != 1
    elif view == "expanded":
        hidden = hidden[:1, :4].expand(2, 4, 24)                 # stride 0
    else:
        weight = weight.t().contiguous().t()                     # (V, H) view of an (H, V) matrix
    targets = torch.randint(0, 100, hidden.shape[:-1], device=DEVICE)
    _, _, (grad_hidden, grad_weight, _) = check(hidden, weight, bias, targets)
    assert grad_hidden.shape == hidden.shape and grad_hidden.is_contiguous()
    assert grad_weight.shape == weight.shape


def test_masked_vocabulary_and_large_logits():
    hidden, weight, bias = make_inputs(12, 16, 150, dtype=torch.float32, logit_scale=300.0)
    bias[:40] = -math.inf                                        # never produced
    targets = torch.randint(40, 150, (12,), device=DEVICE)
    logp, entropy, (_, grad_weight, grad_bias) = check(hidden, weight, bias, targets, temperature=0.5)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.all(grad_weight[:40] == 0) and torch.all(grad_bias[:40] == 0)
    masked_target = targets.clone()
    masked_target[[1, 5]] = torch.tensor([3, 39], device=DEVICE)
    logp, _, _ = linear_head.linear_token_logprobs_fwd(hidden, weight, bias, masked_target, 2.0, 0, False, False)
    assert logp[1] == -math.inf and logp[5] == -math.inf and torch.isfinite(logp[[0, 2, 3, 4]]).all()


def test_a_whole_piece_of_minus_inf():
    # piece 0 and the first backward chunk see only -inf: their (m, s, w) = (-inf, 0, 0) must merge cleanly
    hidden, weight, bias = make_inputs(10, 16, 200, dtype=torch.float32)
    bias[:100] = -math.inf
    targets = torch.randint(100, 200, (10,), device=DEVICE)
    config = linear_head.with_config(linear_head.default_config(DEVICE), pieces=2, vocab_chunk=64)
    check(hidden, weight, bias, targets, config=config)


def test_nan_poisons_only_its_row_and_ignored_rows_stay_zero():
    hidden, weight, bias = make_inputs(6, 16, 90, dtype=torch.float32)
    hidden[1, 4] = math.nan
    hidden[4, 0] = math.nan                                      # and row 4 is ignored
    targets = torch.randint(0, 90, (6,), device=DEVICE)
    targets[4] = -1
    logp, entropy, lse, (grad_hidden, grad_weight, grad_bias), _ = run(hidden, weight, bias, targets, ignore_index=-1)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1]) and torch.isnan(grad_hidden[1]).all()
    assert logp[4] == 0 and entropy[4] == 0 and lse[4] == 0 and torch.all(grad_hidden[4] == 0)
    keep = [0, 2, 3, 5]
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(grad_hidden[keep]).all()
    # row 1's NaN reaches every weight row through dz (as in the reference); row 4 adds nothing
    assert torch.isnan(grad_weight).any() and torch.isnan(grad_bias).all()


def test_all_rows_ignored_and_empty_inputs():
    hidden, weight, bias = make_inputs(5, 8, 50)
    targets = torch.full((5,), -7, device=DEVICE)
    logp, entropy, lse, grads, _ = run(hidden, weight, bias, targets, ignore_index=-7)
    assert torch.all(logp == 0) and torch.all(entropy == 0) and torch.all(lse == 0)
    assert all(torch.all(g == 0) for g in grads)
    empty = hidden[:0]
    logp, entropy, lse, (grad_hidden, grad_weight, grad_bias), _ = run(empty, weight, bias,
                                                                       targets[:0])
    assert logp.shape == entropy.shape == lse.shape == (0,)
    assert grad_hidden.shape == (0, 8) and torch.all(grad_weight == 0) and torch.all(grad_bias == 0)


@pytest.mark.parametrize("need", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1)], ids=["hidden", "weight", "bias",
                                                                              "hidden+bias"])
def test_only_the_gradients_asked_for(need):
    hidden, weight, bias = make_inputs(19, 24, 130, dtype=torch.bfloat16)
    targets = torch.randint(0, 130, (19,), device=DEVICE)
    full = run(hidden, weight, bias, targets)[3]
    partial = run(hidden, weight, bias, targets, need=need)[3]
    for wanted, a, b in zip(need, full, partial):
        if wanted:
            assert torch.equal(a, b), "the same gradient whether or not the others are computed"
        else:
            assert b.numel() == 0


def test_default_path_is_deterministic():
    """Every sum has one owner and a fixed order (no atomics): two runs are bit-identical."""
    hidden, weight, bias = make_inputs(45, 40, 333, dtype=torch.bfloat16)
    targets = torch.randint(0, 333, (45,), device=DEVICE)
    config = linear_head.with_config(linear_head.default_config(DEVICE), pieces=5, vocab_chunk=32)
    first, second = (run(hidden, weight, bias, targets, temperature=0.8, config=config) for _ in range(2))
    for a, b in zip(first[:3] + first[3], second[:3] + second[3]):
        assert torch.equal(a, b)


def test_64_bit_offsets_of_hidden_and_weight_rows():
    """Rows of hidden and weight 2^29 + 64 elements apart: row index x stride passes 2^31, which a
    32-bit offset would wrap. On the CPU the storages are 4 GiB of untouched (not resident) memory."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 32 * 2**30:
        pytest.skip("needs two 4 GiB buffers on the GPU")
    stride = 2**29 + 64
    rows, hidden_size, vocab = 5, 16, 5
    storage_h = torch.empty(stride * (rows - 1) + hidden_size, dtype=torch.bfloat16, device=DEVICE)
    storage_w = torch.empty(stride * (vocab - 1) + hidden_size, dtype=torch.bfloat16, device=DEVICE)
    hidden = storage_h.as_strided((rows, hidden_size), (stride, 1))
    weight = storage_w.as_strided((vocab, hidden_size), (stride, 1))
    values_h, values_w, _ = make_inputs(rows, hidden_size, vocab, dtype=torch.bfloat16, with_bias=False)
    hidden.copy_(values_h)
    weight.copy_(values_w)
    targets = torch.tensor([0, 4, 2, 1, 3], device=DEVICE)
    check(hidden, weight, None, targets, temperature=1.1)


def test_reference_op_agrees_with_the_launcher_contract():
    # the launcher's inputs and outputs are the op layer's: flattened rows, the (..., H) gradient shape
    hidden, weight, bias = make_inputs(None, 16, 77, lead=(3, 4))
    targets = torch.randint(0, 77, (3, 4), device=DEVICE)
    logp, _, _ = linear_head.linear_token_logprobs_fwd(hidden, weight, bias, targets.reshape(-1), 1.0, 0, False,
                                                       False)
    assert_close(logp.view(3, 4), reference(hidden.double(), weight.double(), targets, bias=bias.double()),
                 rtol=2e-6, atol=2e-6)


def test_vocab_chunk_stays_within_the_memory_fraction():
    """scratch + lo (+ the copy of hidden when its rows need one) <= 4.8 % of the bf16 logits wherever that
    leaves room for the floor of 8 grad tiles; otherwise the chunk is that floor (module docstring)."""
    config = linear_head.HOPPER
    step = math.lcm(config.dlogits.block_n, config.grad.block_m, config.grad.block_k)
    for rows, hidden_size, vocab in ((16384, 576, 49152), (8192, 4096, 128256), (65536, 896, 151936),
                                     (4096, 4096, 32000)):
        for copied in (False, True):
            chunk = linear_head.vocab_chunk(rows, hidden_size, vocab, torch.bfloat16, config, hidden_copied=copied)
            assert chunk % config.grad.block_k == 0 and chunk % config.dlogits.block_n == 0
            fixed = rows * hidden_size * 2 * (2 if copied else 1)  # lo (+ the copy of hidden)
            logits = rows * vocab * 2
            if fixed + rows * 8 * step * 2 <= linear_head.MEMORY_FRACTION * logits:
                assert rows * chunk * 2 + fixed <= linear_head.MEMORY_FRACTION * logits, (rows, hidden_size, vocab)
            else:
                assert chunk == 8 * step, (rows, hidden_size, vocab, copied)
    # the acceptance shapes fit without a copy of hidden
    assert linear_head.vocab_chunk(8192, 4096, 128256, torch.bfloat16, config) == 2048
    assert linear_head.vocab_chunk(8, 16, 100, torch.bfloat16, config) == 128  # tiny: one chunk, V rounded up


@pytest.mark.parametrize("view", ["matrix", "time_slice", "transpose", "three_strides"])
def test_rows_are_read_in_place_unless_no_two_level_layout_fits(view):
    """hidden's rows as one strided matrix, or an (outer, inner) pair of strides (``hidden[:, :-1]``,
    a transposed (T, B, H) view): read in place; only a view that needs three strides is copied."""
    base = torch.randn(2, 3, 4, 6, 16, dtype=torch.float64)
    hidden = {"matrix": base[0, 0], "time_slice": base[0, :, :-1], "transpose": base[0, :, 0].transpose(0, 1),
              "three_strides": base[:, :, 1:, 1:]}[view]
    x, _, _, _, _, split_rows, copied = linear_head._row_layout(hidden)
    assert (split_rows, copied) == {"matrix": (False, False), "time_slice": (True, False),
                                    "transpose": (True, False), "three_strides": (False, True)}[view]
    if not copied:
        assert x.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    hidden = hidden.to(torch.bfloat16).to(DEVICE)
    _, weight, bias = make_inputs(1, 16, 70, dtype=torch.bfloat16)
    targets = torch.randint(0, 70, hidden.shape[:-1], device=DEVICE)
    _, _, (grad_hidden, _, _) = check(hidden, weight, bias, targets, temperature=0.9)
    assert grad_hidden.shape == hidden.shape


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the GPU runs the script itself (benchmarks/gpu.sh linear-head)")
def test_gpu_script_runs_end_to_end_on_the_interpreter(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-m", "benchmarks.linear_head_gpu", "--dry-run", "--no-sweep", "--out",
                          str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "== linear_head: summary" in run.stdout
    report = json.loads((tmp_path / "linear_head_gpu-dry-run.json").read_text())
    assert report["correctness"] and all(case["ok"] for case in report["correctness"])
    variants = {(row["variant"], row["mode"]) for row in report["timings"] if "ms" in row}
    assert {("linear_head", "fwd"), ("linear_head", "fwd+bwd"), ("bare bf16 GEMMs", "fwd+bwd"),
            ("up-front weights (experiment)", "fwd+bwd")} <= variants
