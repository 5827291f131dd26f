"""linear_token_logprobs: every compiled backend against the float64 reference (full logits);
the Triton backend's routing (tensor-core linear_head for bf16 / fp16 and TF32, the hybrid or
linear_head for exact fp32 / fp64: both engines are tested); peak memory; bad input.

Gradients are checked against the error model of tests/_rounding_model.py: the tensor-core engine
rounds dz to the operand dtype before its GEMMs; the C++ kernels and the hybrid keep dz in fp32 and
meet the same bound with room to spare."""

import importlib
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from benchmarks._memory import peak_extra_bytes
from cai_kernels.reference import linear_token_logprobs as reference
from cai_kernels.triton import linear_head
from cai_kernels.triton import linear_token_logprobs as triton_backend
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._rounding_model import assert_gradients_within_model, exact

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = compiled_backends("linear_token_logprobs", DEVICE)
op_module = importlib.import_module("cai_kernels.ops.linear_token_logprobs")


@pytest.fixture
def blocks(monkeypatch):
    """Set (vocab_block, token_chunk) of the C++ kernels and of the Triton backend's hybrid engine: small
    blocks put many blocks, a ragged last block and several token chunks into inputs small enough for
    Triton's interpreter. The tensor-core engine keeps its own blocking (the interpreter's is small:
    16 x 32 x 16 tiles, 3 vocabulary pieces, 64-column backward chunks)."""

    def set_blocks(vocab_block, token_chunk):
        monkeypatch.setitem(op_module.BLOCKING, "cpu", (vocab_block, token_chunk))
        monkeypatch.setattr(triton_backend, "VOCAB_BLOCK", vocab_block)
        monkeypatch.setattr(triton_backend, "TOKEN_CHUNK", token_chunk)

    return set_blocks


@pytest.fixture
def exact_route(monkeypatch):
    """Route exact fp32 / fp64 inputs of the Triton backend to one engine (``EXACT_ROUTES``)."""

    def set_route(engine):
        monkeypatch.setitem(triton_backend.EXACT_ROUTES, torch.float32, engine)
        monkeypatch.setitem(triton_backend.EXACT_ROUTES, torch.float64, engine)

    return set_route


def make_inputs(lead, hidden_size, vocab, *, dtype=torch.float32, with_bias=True, logit_scale=3.0):
    """hidden, weight, bias scaled so that the logits have standard deviation ~ logit_scale."""
    hidden = torch.randn(*lead, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * (logit_scale / math.sqrt(hidden_size))
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def check_forward_backward(hidden, weight, bias, targets, backend, *, temperature=1.0, ignore_index=None,
                           entropy_weight=0.37):
    """Forward (log-probs + entropy) and the gradients of a weighted sum w.r.t. hidden, weight, bias,
    each against the reference in float64 on the very values the kernel saw (the gradients under the
    error model of tests/_rounding_model.py)."""
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=True)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = cai_kernels.linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend,
                                                      **kwargs)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert logp.dtype == entropy.dtype == out_dtype
    assert logp.shape == entropy.shape == targets.shape

    # upstream gradients that fp32 holds exactly: the kernels and the reference see the same values
    weights = torch.rand(targets.shape, dtype=torch.float32).double()
    entropy_weight = float(torch.tensor(entropy_weight, dtype=torch.float32))
    upstream = (weights, torch.full(targets.shape, entropy_weight, dtype=torch.float64))
    ref_logp, ref_entropy, _, ref_grads, (dz_parts, sizes), (h64, w64) = exact(
        hidden, weight, bias, targets, upstream, temperature=temperature, ignore_index=ignore_index)
    tol = 1e-10 if hidden.dtype == torch.float64 else 2e-5
    assert_close(logp, ref_logp, rtol=tol, atol=tol, msg="log-probs")
    assert_close(entropy, ref_entropy, rtol=tol, atol=tol, msg="entropy")

    (logp * weights.to(logp).reshape(logp.shape)).sum().add((entropy * entropy_weight).sum()).backward()
    grads = [None if leaf is None else leaf.grad for leaf in leaves]
    for leaf, grad in zip(leaves, grads):
        if leaf is not None:
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    assert_gradients_within_model(grads, ref_grads, dz_parts, sizes, h64, w64, hidden.dtype,
                                  interpreted=backend == "triton" and DEVICE.type == "cpu")
    return logp, entropy, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_reference_across_blocks_and_chunks(backend, dtype, blocks):
    blocks(256, 4)  # V = 1000 = 3 * 256 + 232; 10 rows = 2 * 4 + 2
    hidden, weight, bias = make_inputs((2, 5), 16, 1000, dtype=dtype)
    targets = torch.randint(0, 1000, (2, 5), device=DEVICE)
    check_forward_backward(hidden, weight, bias, targets, backend, temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocking_with_vocab_not_a_block_multiple(backend):
    hidden, weight, bias = make_inputs((4,), 8, 49157)
    targets = torch.tensor([0, 49156, 1024, 4096], device=DEVICE)  # block edges of either backend
    check_forward_backward(hidden, weight, bias, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_block,token_chunk", [(1, 1), (7, 3), (1000, 100)])
def test_extreme_blockings(backend, vocab_block, token_chunk, blocks):
    blocks(vocab_block, token_chunk)
    hidden, weight, bias = make_inputs((6,), 5, 33)
    targets = torch.randint(0, 33, (6,), device=DEVICE)
    check_forward_backward(hidden, weight, bias, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_ignore_index(backend, blocks):
    blocks(64, 4)
    hidden, weight, bias = make_inputs((2, 5), 12, 201)
    targets = torch.randint(0, 201, (2, 5), device=DEVICE)
    targets[0, 3] = targets[1, 0] = -100
    logp, entropy, (grad_hidden, _, _) = check_forward_backward(hidden, weight, bias, targets, backend,
                                                                temperature=0.6, ignore_index=-100)
    assert logp[0, 3] == 0 and entropy[1, 0] == 0
    assert torch.all(grad_hidden[0, 3] == 0) and torch.all(grad_hidden[1, 0] == 0), \
        "ignored positions must get zero gradient"
    assert torch.all(logp[targets != -100] < 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_gradients(backend):
    hidden, weight, bias = make_inputs((4,), 6, 50)
    targets = torch.full((4,), -1, device=DEVICE)
    logp, entropy, grads = check_forward_backward(hidden, weight, bias, targets, backend, ignore_index=-1)
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", ["transpose", "time_slice", "column_stride", "expanded", "weight_transposed"])
def test_non_contiguous_views(backend, dtype, view, blocks):
    blocks(64, 4)
    hidden, weight, bias = make_inputs((2, 5), 24, 100, dtype=dtype)
    if view == "transpose":
        hidden = hidden.transpose(0, 1)                          # (T, B, H) view of (B, T, H)
    elif view == "time_slice":
        hidden = hidden[:, :-1]                                  # the positions that predict a next token
    elif view == "column_stride":
        hidden = make_inputs((24,), 10, 1, dtype=dtype)[0].view(24, 2, 5).permute(1, 2, 0)  # stride(-1) != 1
    elif view == "expanded":
        hidden = hidden[:1, :4].expand(2, 4, 24)                 # stride 0
    else:
        weight = weight.t().contiguous().t()                     # (V, H) view of an (H, V) matrix
    targets = torch.randint(0, 100, hidden.shape[:-1], device=DEVICE)
    check_forward_backward(hidden, weight, bias, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_frozen_head(backend, blocks):
    blocks(32, 5)
    hidden, weight, _ = make_inputs((7,), 10, 100, with_bias=False)
    targets = torch.randint(0, 100, (7,), device=DEVICE)
    check_forward_backward(hidden, weight, None, targets, backend)
    # a frozen LM head: only hidden gets a gradient (the kernel skips the weight GEMM)
    leaf = hidden.detach().requires_grad_()
    cai_kernels.linear_token_logprobs(leaf, weight, targets, backend=backend).sum().backward()
    ones = torch.ones(targets.shape, dtype=torch.float64)
    _, _, _, (ref_grad, _, _), (dz_parts, sizes), (h64, w64) = exact(hidden, weight, None, targets,
                                                                     (ones, ones.new_empty(0)))
    assert weight.grad is None
    assert_gradients_within_model((leaf.grad, None, None), (ref_grad, None, None), dz_parts, sizes, h64, w64,
                                  hidden.dtype, interpreted=backend == "triton" and DEVICE.type == "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_through_minus_inf_bias(backend, blocks):
    blocks(32, 4)
    hidden, weight, bias = make_inputs((4,), 8, 100)
    bias[:40] = -math.inf                                        # the first 40 tokens can never be produced
    targets = torch.tensor([45, 50, 99, 70], device=DEVICE)
    logp, entropy, (_, grad_weight, grad_bias) = check_forward_backward(hidden, weight, bias, targets, backend)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.all(grad_weight[:40] == 0) and torch.all(grad_bias[:40] == 0)
    masked = cai_kernels.linear_token_logprobs(hidden, weight, torch.tensor([5, 50, 7, 70], device=DEVICE), bias=bias,
                                               backend=backend)
    assert masked[0] == -math.inf and masked[2] == -math.inf and torch.isfinite(masked[[1, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_only_its_row(backend):
    hidden, weight, bias = make_inputs((3,), 8, 300)
    hidden[1, 4] = math.nan
    logp, entropy = cai_kernels.linear_token_logprobs(hidden, weight, torch.tensor([1, 2, 3], device=DEVICE),
                                                      bias=bias, return_entropy=True, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_scalar_target_and_empty_batch(backend):
    hidden, weight, bias = make_inputs((), 8, 77)
    target = torch.tensor(5, device=DEVICE)
    logp = cai_kernels.linear_token_logprobs(hidden, weight, target, bias=bias, backend=backend)
    assert logp.shape == ()
    assert_close(logp, reference(hidden.double(), weight.double(), target, bias=bias.double()))
    empty = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    logp = cai_kernels.linear_token_logprobs(empty, weight, torch.empty(0, dtype=torch.long, device=DEVICE),
                                             backend=backend)
    assert logp.shape == (0,)
    logp.sum().backward()
    assert empty.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, blocks):
    blocks(4, 3)  # 9 = 2 * 4 + 1 vocabulary rows, 4 = 3 + 1 tokens
    hidden, weight, bias = (t.requires_grad_() for t in make_inputs((2, 2), 3, 9, dtype=torch.float64))
    targets = torch.randint(0, 9, (2, 2), device=DEVICE)
    targets[1, 1] = -1

    def both_outputs(h, w, b):
        return cai_kernels.linear_token_logprobs(h, w, targets, bias=b, temperature=0.7, ignore_index=-1,
                                                 return_entropy=True, backend=backend)

    # the interpreter runs each Triton program in Python: random projections instead of the full Jacobian
    assert torch.autograd.gradcheck(both_outputs, (hidden, weight, bias), fast_mode=backend == "triton")


@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    hidden_size=st.integers(1, 40),
    vocab=st.integers(1, 300),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    temperature=st.floats(0.1, 5.0),
    scale=st.floats(0.0, 10.0),
    use_bias=st.booleans(),
    use_ignore=st.booleans(),
    vocab_block=st.integers(1, 128),
    token_chunk=st.integers(1, 9),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(lead, hidden_size, vocab, dtype, temperature, scale, use_bias, use_ignore,
                                    vocab_block, token_chunk, backend):
    hidden, weight, bias = make_inputs(lead, hidden_size, vocab, dtype=dtype, with_bias=use_bias, logit_scale=scale)
    targets = torch.randint(0, vocab, tuple(lead), device=DEVICE)
    ignore_index = None
    if use_ignore and targets.numel():
        ignore_index = -100
        targets.view(-1)[0] = -100
    with pytest.MonkeyPatch.context() as patch:
        from cai_kernels.triton import linear_token_logprobs as linear_logprobs
        patch.setitem(op_module.BLOCKING, "cpu", (vocab_block, token_chunk))
        patch.setattr(linear_logprobs, "VOCAB_BLOCK", vocab_block)
        patch.setattr(linear_logprobs, "TOKEN_CHUNK", token_chunk)
        logp, entropy = cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                                          ignore_index=ignore_index, return_entropy=True,
                                                          backend=backend)
    ref_logp, ref_entropy = reference(hidden.double(), weight.double(), targets,
                                      bias=None if bias is None else bias.double(), temperature=temperature,
                                      ignore_index=ignore_index, return_entropy=True)
    # fp32 rounding of the logits is relative to their magnitude, ~ (scale + bias) / temperature
    tol = 4e-6 * (1 + (scale + 4) / temperature)
    assert_close(logp, ref_logp, rtol=tol, atol=tol)
    assert_close(entropy, ref_entropy, rtol=tol, atol=tol)


# ---- the Triton backend's routing: tensor cores for 16-bit (and TF32), a table for exact fp32 / fp64 --------

def test_routing_table():
    engine = triton_backend.engine
    for dtype in (torch.bfloat16, torch.float16):
        assert engine(dtype, tf32=False) == engine(dtype, tf32=True) == triton_backend.LINEAR_HEAD
    assert engine(torch.float32, tf32=True) == triton_backend.LINEAR_HEAD
    assert engine(torch.float32, tf32=False) == triton_backend.EXACT_ROUTES[torch.float32]
    assert engine(torch.float64, tf32=True) == triton_backend.EXACT_ROUTES[torch.float64]
    assert set(triton_backend.EXACT_ROUTES.values()) <= {triton_backend.LINEAR_HEAD, triton_backend.HYBRID}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_each_dtype_reaches_its_engine(dtype, monkeypatch):
    """The op's Triton backend calls linear_head's launchers, forward and backward, for 16-bit inputs (and
    for exact fp32 only where the table says so), the hybrid's otherwise: counted, not assumed."""
    calls = []
    for name in ("linear_token_logprobs_fwd", "linear_token_logprobs_bwd"):
        launcher = getattr(linear_head, name)
        monkeypatch.setattr(linear_head, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    hidden, weight, bias = make_inputs((3, 4), 16, 90, dtype=dtype)
    leaf = hidden.detach().requires_grad_()
    targets = torch.randint(0, 90, (3, 4), device=DEVICE)
    cai_kernels.linear_token_logprobs(leaf, weight, targets, bias=bias, backend="triton").sum().backward()
    tf32 = DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    expected = triton_backend.engine(dtype, tf32)
    assert calls == (["linear_token_logprobs_fwd", "linear_token_logprobs_bwd"]
                     if expected == triton_backend.LINEAR_HEAD else [])


@pytest.mark.parametrize("engine", [triton_backend.LINEAR_HEAD, triton_backend.HYBRID])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_inputs_on_either_engine(engine, dtype, exact_route, blocks):
    """Whichever engine EXACT_ROUTES names after the next GPU run, exact fp32 and fp64 are right on it."""
    exact_route(engine)
    blocks(64, 4)
    hidden, weight, bias = make_inputs((2, 7), 20, 301, dtype=dtype)
    hidden = hidden[:, 1:]                                        # an (outer, inner) view, read in place
    targets = torch.randint(0, 301, (2, 6), device=DEVICE)
    targets[1, 2] = -100
    check_forward_backward(hidden, weight, bias, targets, "triton", temperature=0.8, ignore_index=-100)


def test_gradcheck_float64_on_the_tensor_core_engine(exact_route):
    exact_route(triton_backend.LINEAR_HEAD)
    hidden, weight, bias = (t.requires_grad_() for t in make_inputs((2, 3), 4, 40, dtype=torch.float64))
    targets = torch.randint(0, 40, (2, 3), device=DEVICE)
    targets[0, 1] = -1

    def both_outputs(h, w, b):
        return cai_kernels.linear_token_logprobs(h, w, targets, bias=b, temperature=0.7, ignore_index=-1,
                                                 return_entropy=True, backend="triton")

    assert torch.autograd.gradcheck(both_outputs, (hidden, weight, bias), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logprobs_are_the_fp32_accumulated_gemm_not_bf16_rounded_logits(backend):
    """The numerics contract, through the public op: log-probs of the fp32-accumulated GEMM of the bf16
    operands (what cuBLAS gives with fp32 output), far closer to it than the log-probs of bf16-rounded
    logits are."""
    hidden, weight, _ = make_inputs((24,), 256, 200, dtype=torch.bfloat16, with_bias=False, logit_scale=8.0)
    targets = torch.randint(0, 200, (24,), device=DEVICE)
    logp = cai_kernels.linear_token_logprobs(hidden, weight, targets, backend=backend)
    fp32_logits = hidden.double() @ weight.double().t()  # bf16 products are exact; fp64 sums them exactly enough
    from_fp32 = cai_kernels.token_logprobs(fp32_logits, targets, backend="reference")
    from_bf16 = cai_kernels.token_logprobs(fp32_logits.float().bfloat16().double(), targets, backend="reference")
    error = (logp.double() - from_fp32).abs().max().item()
    rounding_gap = (from_bf16 - from_fp32).abs().max().item()
    assert error < 5e-5, error
    assert rounding_gap > 100 * error, (rounding_gap, error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_backend_is_deterministic(dtype):
    """No atomics on either engine: two runs give bit-identical log-probs, entropies and gradients."""
    hidden, weight, bias = make_inputs((5, 9), 24, 333, dtype=dtype)
    targets = torch.randint(0, 333, (5, 9), device=DEVICE)

    def run():
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = cai_kernels.linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2],
                                                          temperature=0.8, return_entropy=True, backend="triton")
        (logp.sum() + 0.3 * entropy.sum()).backward()
        return [logp, entropy] + [leaf.grad for leaf in leaves]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_64_bit_offsets_of_hidden_rows(backend):
    """Rows of hidden 2^29 + 64 elements apart (bf16): row index x stride passes 2^31, which a 32-bit
    offset would wrap. On the CPU the storage is 1 GiB of untouched (not resident) memory."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs a 1 GiB buffer on the GPU")
    stride, rows, hidden_size = 2**29 + 64, 5, 16
    storage = torch.empty(stride * (rows - 1) + hidden_size, dtype=torch.bfloat16, device=DEVICE)
    hidden = storage.as_strided((rows, hidden_size), (stride, 1))
    values, weight, bias = make_inputs((rows,), hidden_size, 37, dtype=torch.bfloat16)
    hidden.copy_(values)
    targets = torch.randint(0, 37, (rows,), device=DEVICE)
    check_forward_backward(hidden, weight, bias, targets, backend, temperature=1.1)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 is a CUDA matmul mode")
def test_fp32_under_tf32_takes_the_tensor_cores(monkeypatch):
    """allow_tf32: fp32 inputs run on linear_head in TF32; the log-probs are those of the logits within
    TF32's rounding of both operands (2^-11 each: |error of z| <= 2 * 2^-11 sum_k |x_k w_k| / T)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert triton_backend._engine_for(torch.empty(1, device=DEVICE)) == triton_backend.LINEAR_HEAD
    hidden, weight, bias = make_inputs((64,), 256, 1000)
    targets = torch.randint(0, 1000, (64,), device=DEVICE)
    logp = cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.9, backend="triton")
    ref = reference(hidden.double(), weight.double(), targets, bias=bias.double(), temperature=0.9)
    products = (hidden.double().abs() @ weight.double().abs().t()) / 0.9
    # log p moves by at most twice the largest logit error of its row (z_t and the log-sum-exp)
    bound = 2 * 2 * 2.0**-11 * products.max(-1).values + 1e-5
    assert torch.all((logp.double() - ref).abs().cpu() <= bound.cpu())


def test_backends_agree_with_each_other():
    hidden, weight, bias = make_inputs((5, 7), 32, 1234, dtype=torch.bfloat16)
    targets = torch.randint(0, 1234, (5, 7), device=DEVICE)
    outs = [cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=p.values[0])
            for p in BACKENDS]
    for out in outs[1:]:
        assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_matches_token_logprobs_on_materialized_logits():
    hidden, weight, bias = make_inputs((4, 6), 16, 500)
    targets = torch.randint(0, 500, (4, 6), device=DEVICE)
    fused = cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=1.3)
    unfused = cai_kernels.token_logprobs(torch.nn.functional.linear(hidden, weight, bias), targets, temperature=1.3)
    assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels run on CPU tensors")
def test_cpu_results_are_bitwise_the_same_for_any_thread_count(blocks):
    # threads take vocabulary blocks in any order, but commit into shared rows in block order
    blocks(64, 6)
    hidden, weight, bias = make_inputs((20,), 16, 1000, dtype=torch.bfloat16)
    targets = torch.randint(0, 1000, (20,), device=DEVICE)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
            logp, entropy = cai_kernels.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], return_entropy=True,
                                                              backend="cpu")
            (logp.sum() + entropy.sum()).backward()
            results.append([logp, entropy] + [leaf.grad for leaf in leaves])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_cpu_token_chunk_shrinks_with_threads(monkeypatch):
    # one logits block per thread: with many threads the blocks together stay within the budget
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    vocab_block, token_chunk = op_module.BLOCKING["cpu"]
    chunk = op_module._cpu_token_chunk(vocab_block, token_chunk)
    assert chunk < token_chunk and 64 * 4 * vocab_block * chunk <= op_module.CPU_SCRATCH_BYTES
    assert op_module._cpu_token_chunk(vocab_block, 3) == 3  # small chunks (tests) are kept


# ---- peak memory, measured in fresh processes: one logits block, not tokens x V -----------------------

MEMORY_FACTORY = "benchmarks._linear_variants:fwd_bwd_step"
MEMORY_HIDDEN, MEMORY_VOCAB = 64, 32768
MB = 2**20


@pytest.mark.slow
def test_peak_memory_does_not_grow_like_tokens_times_vocab():
    small, large = 1024, 4096
    logits_bytes = lambda tokens: tokens * MEMORY_VOCAB * 4  # noqa: E731 - an fp32 [tokens, V] tensor
    ours = {n: peak_extra_bytes(MEMORY_FACTORY, variant="cai_kernels", tokens=n, hidden_size=MEMORY_HIDDEN,
                                vocab=MEMORY_VOCAB).extra
            for n in (small, large)}
    eager = peak_extra_bytes(MEMORY_FACTORY, variant="eager_head_log_softmax_gather", tokens=small,
                             hidden_size=MEMORY_HIDDEN, vocab=MEMORY_VOCAB).extra
    # the measurement sees the logits when they exist (eager keeps several [tokens, V] tensors alive)
    assert eager > logits_bytes(small), f"eager peak {eager / MB:.0f} MB"
    growth = ours[large] - ours[small]
    assert ours[large] < 0.1 * logits_bytes(large), f"peak {ours[large] / MB:.0f} MB at {large} tokens"
    assert growth < 0.1 * (logits_bytes(large) - logits_bytes(small)), f"grew by {growth / MB:.0f} MB"


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


@pytest.fixture
def targets():
    return torch.randint(0, 11, (2, 3), device=DEVICE)


@pytest.fixture
def head():
    """hidden (2, 3, 8), weight (11, 8), bias (11,)."""
    return torch.randn(2, 3, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE), torch.randn(11, device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_value", [11, -1, 10**12])
def test_target_out_of_range_is_a_value_error(backend, head, targets, bad_value):
    hidden, weight, bias = head
    targets[1, 2] = bad_value
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    targets[0, 0] = -100
    with pytest.raises(ValueError, match="targets"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, ignore_index=-100, backend=backend)


def test_operand_types(head, targets):
    hidden, weight, bias = head
    with pytest.raises(TypeError, match="hidden must have dtype"):
        cai_kernels.linear_token_logprobs(hidden.long(), weight, targets)
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype \(torch.float32\); got torch.bfloat16"):
        cai_kernels.linear_token_logprobs(hidden, weight.bfloat16(), targets)
    with pytest.raises(TypeError, match=r"bias must have hidden's dtype"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias.double())
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        cai_kernels.linear_token_logprobs(hidden, None, targets)
    with pytest.raises(TypeError, match=r"targets must be int64 with shape \(2, 3\)"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets.int())


def test_operand_shapes(head, targets):
    hidden, weight, bias = head
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H\) with V >= 1 and H = hidden.shape\[-1\] = 8"):
        cai_kernels.linear_token_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="weight must have shape"):
        cai_kernels.linear_token_logprobs(hidden, weight[:0], targets)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        cai_kernels.linear_token_logprobs(hidden, weight[None], targets)
    with pytest.raises(ValueError, match=r"bias must have shape \(11,\)"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias[:10])
    with pytest.raises(ValueError, match="hidden must have a non-empty last"):
        cai_kernels.linear_token_logprobs(hidden[..., :0], weight[:, :0], targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets[:, :2])


def test_scalars_and_devices(head, targets):
    hidden, weight, bias = head
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, ignore_index="x")
    with pytest.raises(ValueError, match="weight must be on the same device as hidden"):
        cai_kernels.linear_token_logprobs(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="bias must be on the same device as hidden"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, backend="fortran")
