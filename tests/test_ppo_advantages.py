"""ppo_advantages: every compiled backend against the float64 reference and against our own ops
composed, on every mask shape; bad input; Triton grids."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels import reference
from cai_kernels._params import ESTIMATORS
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, logprobs, normal, response_mask
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("ppo_advantages", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
B, T = 3, 5  # the size of the fixtures rows and rows_mask


def composed(scores, lp, ref, values, mask, backend, *, kl_coef, estimator="k1", whiten=True, **gae_kwargs):
    """The unfused pipeline from our own ops, in the same backend."""
    kl = torch.where(mask != 0, cai_kernels.kl_penalty(lp, ref, estimator, backend=backend), 0.0)
    rewards = reference.shape_rewards(kl, scores, mask, kl_coef=kl_coef)
    adv, ret = cai_kernels.gae(rewards, values, mask, backend=backend, **gae_kwargs)
    if whiten:
        adv = cai_kernels.masked_whiten(adv, mask, backend=backend)
    return adv, ret, rewards, kl


def check_fused(B, T, backend, *, kind="holes", dtype=torch.float32, estimator="k1", whiten=True, **kwargs):
    scores, values = normal(B, 1)[:, 0] * 3, normal(B, T, dtype=dtype)
    lp, ref = logprobs(B, T, dtype=dtype), logprobs(B, T, dtype=dtype)
    mask = response_mask(B, T, kind)
    out = cai_kernels.ppo_advantages(scores, lp, ref, values, mask, kl_coef=0.05, estimator=estimator, whiten=whiten,
                                     backend=backend, **kwargs)
    names = ("advantages", "returns", "token_rewards", "kl")
    ours = composed(scores, lp, ref, values, mask, backend, kl_coef=0.05, estimator=estimator, whiten=whiten, **kwargs)
    exact = reference.ppo_advantages(scores.double(), lp.double(), ref.double(), values.double(), mask, kl_coef=0.05,
                                     estimator=estimator, whiten=whiten, **kwargs)
    for name, a, b, c in zip(names, out, ours, exact):
        assert a.shape == (B, T) and a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name}: fused vs composed")
        assert_close(a, c, rtol=2e-5, atol=2e-5, msg=f"{name}: fused vs float64 reference")
        assert torch.all(a[mask == 0] == 0), name
    return out, mask, scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("estimator", ["k1", "k3", "low_var_kl"])
def test_fused_equals_composition(backend, kind, estimator):
    B, T = (5, 36) if backend == "triton" else (11, 150)
    check_fused(B, T, backend, kind=kind, estimator=estimator, gamma=0.99, lam=0.95)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float64,), ids=str)
@pytest.mark.parametrize("whiten", [True, False])
def test_fused_dtypes(backend, dtype, whiten):
    check_fused(5, 40, backend, dtype=dtype, estimator="k2", whiten=whiten)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_score_lands_on_the_last_response_token(backend):
    (adv, ret, rewards, kl), mask, scores = check_fused(6, 30, backend, kind="left", whiten=False)
    last = torch.tensor([int(torch.nonzero(row)[-1]) for row in mask], device=DEVICE)
    rows = torch.arange(6, device=DEVICE)
    torch.testing.assert_close(rewards[rows, last], scores - 0.05 * kl[rows, last])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_empty_rows_are_zero(backend):
    (adv, ret, rewards, kl), mask, _ = check_fused(5, 20, backend, kind="empty_rows")
    for out in (adv, ret, rewards, kl):
        assert not out[0].any() and not out[2].any()


def test_fused_many_and_long_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check_fused(65536, 3, "cpu", estimator="k3")
    check_fused(2, 32768, "cpu", estimator="k3")


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 30), kind=st.sampled_from(MASK_KINDS),
       estimator=st.sampled_from(tuple(ESTIMATORS)), whiten=st.booleans(),
       gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0), backend=st.sampled_from(BACKEND_NAMES))
def test_fused_property(B, T, kind, estimator, whiten, gamma, lam, backend):
    check_fused(B, T, backend, kind=kind, estimator=estimator, whiten=whiten, gamma=gamma, lam=lam)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

def test_advantages_arguments(rows, rows_mask):
    scores = normal(1, B)[0]
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\) \(one score per row of logprobs\)"):
        cai_kernels.ppo_advantages(scores[:2], rows, rows, rows, rows_mask, kl_coef=0.1)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        cai_kernels.ppo_advantages([1.0, 2.0, 3.0], rows, rows, rows, rows_mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"values must have shape \(3, 5\) \(like logprobs\)"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows[:, 1:], rows_mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a finite number in"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows, rows_mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows, rows_mask, kl_coef=0.1, estimator="k5")
    with pytest.raises(TypeError, match="whiten must be a bool"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows, rows_mask, kl_coef=0.1, whiten=None)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows, rows_mask, kl_coef=0.1, gamma=2.0)
    with pytest.raises(TypeError, match="kl_coef"):
        cai_kernels.ppo_advantages(scores, rows, rows, rows, rows_mask)


def test_unknown_backend(rows, rows_mask):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.ppo_advantages(normal(1, B)[0], rows, rows, rows, rows_mask, kl_coef=0.1, backend="fortran")


def test_grid_is_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import KlEstimator, PpoAdvantagesParams
    from cai_kernels.triton import _whiten, ppo_advantages as kernels

    params = PpoAdvantagesParams(0.1, 1.0, 0.95, KlEstimator.K1, -1.0, 1.0, -1.0, 1.0, True)
    assert_grids_are_one_dimensional(monkeypatch, kernels, ["ppo_advantages_kernel"],
                                     lambda x, m: kernels.ppo_advantages_fwd(x[:, 0].contiguous(), x, x, x, m, params),
                                     persistent=(_whiten, ["whiten_kernel"]))
