"""kl_penalty: every compiled backend against the float64 reference; clamps, extremes, gradients;
bad input; Triton grids."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import kl_penalty as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance
from tests._ppo_inputs import DEVICE, logprobs
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("kl_penalty", DEVICE)
ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")


def check(lp, ref, backend, estimator, **clamps):
    """Forward and both gradients against the reference on the very values the kernel saw."""
    lp_leaf, ref_leaf = lp.detach().requires_grad_(), ref.detach().requires_grad_()
    out = cai_kernels.kl_penalty(lp_leaf, ref_leaf, estimator, backend=backend, **clamps)
    expected_dtype = torch.float64 if torch.float64 in (lp.dtype, ref.dtype) else torch.float32
    assert out.dtype == expected_dtype and out.shape == lp.shape
    lp64, ref64 = lp.detach().double().requires_grad_(), ref.detach().double().requires_grad_()
    expected = reference(lp64, ref64, estimator, **clamps)
    assert_close(out, expected, msg=f"{estimator} forward")
    weights = torch.rand_like(expected)
    (out * weights.to(out.dtype)).sum().backward()
    (expected * weights).sum().backward()
    assert lp_leaf.grad.dtype == lp.dtype and ref_leaf.grad.dtype == ref.dtype
    assert_close(lp_leaf.grad, lp64.grad, **grad_tolerance(lp.dtype), msg="d/d logprobs")
    assert_close(ref_leaf.grad, ref64.grad, **grad_tolerance(ref.dtype), msg="d/d ref_logprobs")
    return out, lp_leaf.grad, ref_leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_reference(backend, estimator, dtype):
    check(logprobs(5, 77, dtype=dtype), logprobs(5, 77, dtype=dtype), backend, estimator)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_are_upcast(backend):
    out, grad_lp, grad_ref = check(logprobs(3, 40), logprobs(3, 40, dtype=torch.bfloat16), backend, "k3")
    assert grad_lp.dtype == torch.float32 and grad_ref.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3", "abs"))
@pytest.mark.parametrize("clamps", [dict(clamp=(-0.5, 0.5)), dict(output_clamp=(0.0, 0.3)),
                                    dict(clamp=(None, 0.4), output_clamp=(-0.2, None)),
                                    dict(clamp=(-math.inf, 1.0), output_clamp=(0.1, math.inf))], ids=str)
def test_clamps_and_their_gradients(backend, estimator, clamps):
    lp, ref = logprobs(4, 33), logprobs(4, 33)
    out, grad_lp, _ = check(lp, ref, backend, estimator, **clamps)
    lo, hi = clamps.get("clamp", (None, None))
    raw = (lp - ref).double()
    blocked = torch.zeros_like(raw, dtype=torch.bool)
    if lo is not None:
        blocked |= raw < lo
    if hi is not None:
        blocked |= raw > hi
    assert torch.all(grad_lp[blocked] == 0), "a clamped log-ratio passes no gradient"
    out_lo, out_hi = clamps.get("output_clamp", (None, None))
    if out_lo is not None:
        assert torch.all(out >= out_lo)
    if out_hi is not None:
        assert torch.all(out <= out_hi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_var_kl_is_k3_with_verl_clamps(backend):
    lp, ref = logprobs(3, 50, scale=60.0), logprobs(3, 50, scale=60.0)
    low_var = cai_kernels.kl_penalty(lp, ref, "low_var_kl", backend=backend)
    k3 = cai_kernels.kl_penalty(lp, ref, "k3", clamp=(-20, 20), output_clamp=(-10, 10), backend=backend)
    torch.testing.assert_close(low_var, k3, rtol=0, atol=0)
    assert low_var.max() <= 10 and torch.isfinite(low_var).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_extreme_log_ratios_never_nan(backend, dtype):
    # log-ratios up to +-50 (bf16 rounds them, the reference sees the rounded values)
    lp = torch.tensor([[0.0, -50.0, 0.0, -25.0, -1e-3, 0.0]], dtype=dtype, device=DEVICE)
    ref = torch.tensor([[-50.0, 0.0, 0.0, -1e-3, -25.0, -3e-4]], dtype=dtype, device=DEVICE)
    for estimator in ESTIMATORS:
        out, grad_lp, grad_ref = check(lp, ref, backend, estimator)
        assert torch.isfinite(out).all() and torch.isfinite(grad_lp).all() and torch.isfinite(grad_ref).all()
    k3 = cai_kernels.kl_penalty(lp, ref, "k3", backend=backend)
    assert torch.all(k3 >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_is_accurate_for_tiny_log_ratios(backend):
    # exp(-r) - 1 + r computed naively in fp32 cancels to noise for |r| < 1e-3; ours stays within
    # a few ulp of the fp64 value (relative), which is what keeps low_var_kl estimates meaningful.
    r = torch.logspace(-7, -1, 60, dtype=torch.float64)
    r = torch.cat([r, -r])[None].float().to(DEVICE)
    zeros = torch.zeros_like(r)
    out = cai_kernels.kl_penalty(r, zeros, "k3", backend=backend)
    expected = reference(r.double(), zeros.double(), "k3")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    naive = torch.exp(-r) - 1 + r  # what OpenRLHF / veRL compute
    assert ((naive.double() - expected).abs() / expected).max() > 1e-2, "the naive form should be visibly worse"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_upstream_gradient_stays_zero_where_k3_overflows(backend):
    # r = -100: exp(100) overflows fp32, so k3 is +inf there; a masked-out position (zero upstream
    # gradient) must still get a zero gradient, not 0 * inf = NaN
    lp = torch.tensor([[-100.0, -1.0]], device=DEVICE, requires_grad=True)
    ref = torch.zeros(1, 2, device=DEVICE)
    out = cai_kernels.kl_penalty(lp, ref, "k3", backend=backend)
    assert out[0, 0] == math.inf and torch.isfinite(out[0, 1])
    (out * torch.tensor([[0.0, 1.0]], device=DEVICE)).sum().backward()
    assert lp.grad[0, 0] == 0 and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["time_slice", "transposed", "column_stride", "one_dim", "three_dim", "expanded"])
def test_non_contiguous_and_other_shapes(backend, view):
    base, other = logprobs(6, 41), logprobs(6, 41)
    if view == "time_slice":
        lp, ref = base[:, 1:], other[:, :-1]
    elif view == "transposed":
        lp, ref = base.t(), other.t()
    elif view == "column_stride":
        lp, ref = base[:, ::2], other[:, ::2]
    elif view == "one_dim":
        lp, ref = base[2], other[3]
    elif view == "three_dim":
        lp, ref = base[:, :40].reshape(2, 3, 40), other[:, :40].reshape(2, 3, 40)
    else:
        lp, ref = base[:1].expand(4, 41), other[:4]
    check(lp, ref, backend, "k3")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layouts", ["contiguous_and_permuted", "permuted_and_contiguous", "row_and_column_major"])
def test_inputs_of_different_layouts(backend, layouts):
    """Each input collapses to its own (outer, inner, T) view: a contiguous (2, 3, T) tensor to (1, 6, T), a
    permuted one (its leading strides do not merge) to (2, 3, T); the kernels index both with one row layout."""
    contiguous = logprobs(6, 40).reshape(2, 3, 40)
    permuted = logprobs(6, 40).reshape(3, 2, 40).transpose(0, 1)
    if layouts == "contiguous_and_permuted":
        check(contiguous, permuted, backend, "k3")
    elif layouts == "permuted_and_contiguous":
        check(permuted, contiguous, backend, "k3")
    else:
        check(logprobs(5, 41), logprobs(41, 5).t(), backend, "k3")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 7, 8, 9, 15, 16, 17, 1025])
def test_odd_lengths(backend, T):
    check(logprobs(3, T), logprobs(3, T), backend, "k2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    out = cai_kernels.kl_penalty(logprobs(0, 5), logprobs(0, 5), backend=backend)
    assert out.shape == (0, 5)
    assert cai_kernels.kl_penalty(logprobs(3, 0), logprobs(3, 0), backend=backend).shape == (3, 0)


def test_long_rows_and_many_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check(logprobs(2, 32768), logprobs(2, 32768), "cpu", "k3")
    check(logprobs(65536, 3), logprobs(65536, 3), "cpu", "k3", clamp=(-1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_float64(backend, estimator):
    lp = logprobs(2, 7, dtype=torch.float64).requires_grad_()
    ref = logprobs(2, 7, dtype=torch.float64).requires_grad_()

    def fn(a, b):
        return cai_kernels.kl_penalty(a, b, estimator, clamp=(-2.0, 2.5), output_clamp=(None, 3.0), backend=backend)

    assert torch.autograd.gradcheck(fn, (lp, ref))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 70)),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    estimator=st.sampled_from(ESTIMATORS),
    scale=st.floats(0.0, 60.0),
    clamp=st.one_of(st.none(), st.tuples(st.floats(-30, 0), st.floats(0, 30))),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(shape, dtype, estimator, scale, clamp, backend):
    lp, ref = logprobs(*shape, dtype=dtype, scale=scale), logprobs(*shape, dtype=dtype, scale=scale)
    out = cai_kernels.kl_penalty(lp, ref, estimator, clamp=clamp, backend=backend)
    expected = reference(lp.double(), ref.double(), estimator, clamp=clamp)
    assert not torch.isnan(out).any()
    assert_close(out, expected, rtol=2e-5, atol=2e-5)


B, T = 3, 5  # the size of the fixtures rows and rows_mask


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

def test_types(rows):
    with pytest.raises(TypeError, match="logprobs must be a torch.Tensor"):
        cai_kernels.kl_penalty([[0.0]], rows)
    with pytest.raises(TypeError, match="ref_logprobs must have dtype"):
        cai_kernels.kl_penalty(rows, torch.zeros(B, T, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="logprobs must have at least 1 dimension"):
        cai_kernels.kl_penalty(torch.tensor(0.0), torch.tensor(0.0))


def test_shapes_and_devices(rows):
    with pytest.raises(ValueError, match=r"ref_logprobs must have the shape of logprobs \(3, 5\); got \(3, 4\)"):
        cai_kernels.kl_penalty(rows, logprobs(B, 4))
    with pytest.raises(ValueError, match="ref_logprobs must be on the same device as logprobs"):
        cai_kernels.kl_penalty(rows, rows.to("meta"))


@pytest.mark.parametrize("estimator, error", [("k4", ValueError), ("kl", ValueError), (3, TypeError)])
def test_estimator(rows, estimator, error):
    with pytest.raises(error, match="estimator must be"):
        cai_kernels.kl_penalty(rows, rows, estimator)


@pytest.mark.parametrize("name", ["clamp", "output_clamp"])
@pytest.mark.parametrize("bad, error, message", [
    ((1.0,), TypeError, "pair"), (5.0, TypeError, "pair"), ((2.0, 1.0), ValueError, "lo <= hi"),
    ((math.nan, 1.0), ValueError, "NaN"), (("a", 1.0), TypeError, "lo must be a number"),
])
def test_clamps(rows, name, bad, error, message):
    with pytest.raises(error, match=f"{name}.*{message}"):
        cai_kernels.kl_penalty(rows, rows, "k3", **{name: bad})


def test_unknown_backend(rows):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.kl_penalty(rows, rows, backend="fortran")


def test_grid_is_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import KlEstimator, KlPenaltyParams
    from cai_kernels.triton import kl_penalty as kernels

    params = KlPenaltyParams(KlEstimator.K3, -1.0, 1.0, -1.0, 1.0)
    assert_grids_are_one_dimensional(monkeypatch, kernels, ["kl_penalty_kernel"],
                                     lambda x, m: kernels.kl_penalty_fwd(x[None], x[None], params))
    assert_grids_are_one_dimensional(monkeypatch, kernels, ["kl_penalty_kernel"],
                                     lambda x, m: kernels.kl_penalty_bwd(x, x[None], x[None], params))
