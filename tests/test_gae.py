"""gae, masked_whiten and the fused ppo_advantages: every compiled backend against the float64
reference (the reverse Python loop), on every mask shape; the fused op against our own ops composed."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels import reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, logprobs, normal, response_mask

BACKENDS = compiled_backends("gae", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]


def check_gae(rewards, values, mask, backend, **kwargs):
    adv, ret = cai_kernels.gae(rewards, values, mask, backend=backend, **kwargs)
    expected_adv, expected_ret = reference.gae(rewards.double(), values.double(), mask, **kwargs)
    acc = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    assert adv.dtype == ret.dtype == acc and adv.shape == ret.shape == rewards.shape
    # long sums of (gamma lam)^k terms: fp32 error grows with the advantage's size
    tol = 2e-5 * (1 + expected_adv.abs().max().item())
    assert_close(adv, expected_adv, rtol=tol, atol=tol, msg="advantages")
    assert_close(ret, expected_ret, rtol=tol, atol=tol, msg="returns")
    masked = mask == 0
    assert torch.all(adv[masked] == 0) and torch.all(ret[masked] == 0)
    return adv, ret


# ---- gae -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_gae_matches_reference_loop(backend, kind, dtype):
    B, T = (5, 40) if backend == "triton" else (13, 203)
    check_gae(normal(B, T, dtype=dtype), normal(B, T, dtype=dtype), response_mask(B, T, kind), backend,
              gamma=0.99, lam=0.95)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.0), (0.0, 0.95), (0.9, 0.5)])
def test_gae_discounts(backend, gamma, lam):
    check_gae(normal(6, 37), normal(6, 37), response_mask(6, 37, "holes"), backend, gamma=gamma, lam=lam)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_skip_and_carry_by_hand(backend):
    # steps 0 and 2 are response tokens, step 1 an observation (a hole), step 3 padding
    rewards = torch.tensor([[1.0, 100.0, 2.0, 100.0]], device=DEVICE)
    values = torch.tensor([[0.5, 100.0, 0.25, 100.0]], device=DEVICE)
    mask = torch.tensor([[True, False, True, False]], device=DEVICE)
    gamma, lam = 0.9, 0.8
    adv, ret = cai_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    a2 = 2.0 - 0.25                                     # last response token: next value 0
    a0 = (1.0 + gamma * 0.25 - 0.5) + gamma * lam * a2  # next value and advantage carried over step 1
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, 0.0]], device=DEVICE))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25, 0.0]], device=DEVICE))


def classic_loop(rewards, values, gamma, lam):
    """The unmasked loop of TRL's PPO trainer (padding holds zeros there): what users know."""
    last, advantages = 0.0, []
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    return torch.stack(advantages[::-1], dim=1)


@pytest.mark.parametrize("backend", ["reference"] + BACKEND_NAMES)
def test_gae_equals_the_classic_loop_on_right_padding(backend):
    mask = response_mask(7, 30, "right")
    rewards = normal(7, 30, dtype=torch.float64).masked_fill(mask == 0, 0.0)
    values = normal(7, 30, dtype=torch.float64).masked_fill(mask == 0, 0.0)
    adv, ret = cai_kernels.gae(rewards, values, mask, gamma=0.95, lam=0.9, backend=backend)
    classic = classic_loop(rewards, values, 0.95, 0.9)
    assert_close(adv, classic, rtol=1e-12, atol=1e-12)
    assert_close(ret, (classic + values).masked_fill(mask == 0, 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_ignores_garbage_at_masked_positions(backend):
    mask = response_mask(5, 29, "holes")
    rewards, values = normal(5, 29), normal(5, 29)
    clean = cai_kernels.gae(rewards, values, mask, backend=backend)
    garbage = torch.tensor(float("nan"), device=DEVICE)
    dirty = cai_kernels.gae(rewards.masked_fill(mask == 0, garbage), values.masked_fill(mask == 0, float("inf")), mask,
                            backend=backend)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["sliced", "transposed", "mixed_dtypes"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.int32, torch.float32, torch.int8,
                                        torch.bfloat16], ids=str)
def test_gae_views_and_mask_dtypes(backend, view, mask_dtype):
    mask = response_mask(4, 27, "holes", dtype=mask_dtype)
    base_r, base_v = normal(4, 30), normal(30, 4)
    if view == "sliced":  # row strides that are not T
        rewards, values = base_r[:, 2:-1], normal(8, 27)[::2]
    elif view == "transposed":
        rewards, values = base_r[:, :27], base_v[:27].t()
    else:
        rewards, values = base_r[:, :27], base_v.t()[:, :27].bfloat16()
    check_gae(rewards, values, mask, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 8, 9, 17, 63, 64, 65])
def test_gae_lengths_around_tile_edges(backend, T):
    B = 5 if backend == "triton" else 19  # not a multiple of the row group either
    check_gae(normal(B, T), normal(B, T), response_mask(B, T, "empty_rows"), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_all_masked(backend):
    adv, ret = check_gae(normal(3, 10), normal(3, 10), torch.zeros(3, 10, dtype=torch.bool, device=DEVICE), backend)
    assert not adv.any() and not ret.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_empty(backend):
    adv, ret = cai_kernels.gae(normal(0, 4), normal(0, 4), response_mask(0, 4), backend=backend)
    assert adv.shape == ret.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_float64(backend):
    check_gae(normal(3, 50, dtype=torch.float64), normal(3, 50, dtype=torch.float64), response_mask(3, 50), backend)


def test_gae_many_rows_and_long_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check_gae(normal(65536, 3), normal(65536, 3), response_mask(65536, 3, "holes"), "cpu", gamma=0.99)
    check_gae(normal(3, 32768), normal(3, 32768), response_mask(3, 32768, "holes"), "cpu", gamma=1.0, lam=0.95)


def test_gae_inputs_are_detached():
    values = normal(2, 5).requires_grad_()
    adv, ret = cai_kernels.gae(normal(2, 5), values, response_mask(2, 5))
    assert not adv.requires_grad and not ret.requires_grad


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 40), kind=st.sampled_from(MASK_KINDS),
       gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), scale=st.floats(0.0, 100.0),
       backend=st.sampled_from(BACKEND_NAMES))
def test_gae_property(B, T, kind, gamma, lam, scale, backend):
    check_gae(normal(B, T, scale=scale), normal(B, T, scale=scale), response_mask(B, T, kind), backend,
              gamma=gamma, lam=lam)


# ---- masked_whiten -------------------------------------------------------------------------------

def check_whiten(x, mask, backend, **kwargs):
    out = cai_kernels.masked_whiten(x, mask, backend=backend, **kwargs)
    expected = reference.masked_whiten(x.double(), mask, **kwargs)
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out[mask == 0] == 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float64,), ids=str)
def test_whiten_matches_reference(backend, kind, dtype):
    check_whiten(normal(7, 45, dtype=dtype, scale=3.0), response_mask(7, 45, kind), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_options(backend, shift_mean, unbiased):
    mask = response_mask(5, 33)
    out = check_whiten(normal(5, 33) + 4.0, mask, backend, shift_mean=shift_mean, unbiased=unbiased, eps=1e-3)
    assert abs(out[mask != 0].double().mean().item() - (0.0 if shift_mean else 4.0)) < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_statistics_are_batch_global(backend):
    mask = response_mask(6, 50, "holes")
    out = check_whiten(normal(6, 50, scale=2.0) + 1.0, mask, backend, shift_mean=True, unbiased=True)
    valid = out[mask != 0].double()
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std(unbiased=True).item() - 1.0) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_large_offset_keeps_precision(backend):
    # mean 1e4, std 1: a one-pass sum of squares in fp32 would lose the variance entirely
    check_whiten(normal(8, 64) + 1e4, response_mask(8, 64), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_degenerate_masks(backend):
    x = normal(3, 9)
    empty = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    assert not check_whiten(x, empty, backend).any()
    single = empty.clone()
    single[1, 4] = True
    out = check_whiten(x, single, backend)
    assert not out.any(), "one element: x - mean = 0"
    shifted = check_whiten(x, single, backend, shift_mean=False)
    torch.testing.assert_close(shifted[1, 4], x[1, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_whiten_views_and_garbage(backend):
    x = normal(9, 40)[::2, 3:]
    mask = response_mask(5, 37, "holes")
    clean = check_whiten(x, mask, backend)
    dirty = cai_kernels.masked_whiten(x.masked_fill(mask == 0, float("nan")), mask.float(), backend=backend)
    torch.testing.assert_close(clean, dirty, rtol=0, atol=0)


def test_whiten_many_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check_whiten(normal(65536, 3), response_mask(65536, 3), "cpu")
    check_whiten(normal(2, 32768), response_mask(2, 32768), "cpu")


# ---- ppo_advantages ------------------------------------------------------------------------------

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
       estimator=st.sampled_from(reference.ppo.ESTIMATORS), whiten=st.booleans(),
       gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0), backend=st.sampled_from(BACKEND_NAMES))
def test_fused_property(B, T, kind, estimator, whiten, gamma, lam, backend):
    check_fused(B, T, backend, kind=kind, estimator=estimator, whiten=whiten, gamma=gamma, lam=lam)
