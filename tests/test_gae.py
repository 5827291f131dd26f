"""gae: every compiled backend against the float64 reference (the reverse Python loop), on every mask
shape; bad input; Triton grids."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels import reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, logprobs, normal, response_mask
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("gae", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
B, T = 3, 5  # the size of the fixtures rows and rows_mask


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


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

def test_gae_shapes(rows, rows_mask):
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        cai_kernels.gae(rows[0], rows[0], rows_mask[0])
    with pytest.raises(ValueError, match=r"values must have shape \(3, 5\) \(like rewards\)"):
        cai_kernels.gae(rows, logprobs(B, 4), rows_mask)
    with pytest.raises(ValueError, match=r"response_mask must have shape \(3, 5\)"):
        cai_kernels.gae(rows, rows, rows_mask[:, :4])


def test_gae_types(rows, rows_mask):
    with pytest.raises(TypeError, match="rewards must have dtype"):
        cai_kernels.gae(rows.long(), rows, rows_mask)
    with pytest.raises(TypeError, match="response_mask must be bool, integer or floating"):
        cai_kernels.gae(rows, rows, rows_mask.to(torch.complex64))
    with pytest.raises(TypeError, match="response_mask must be a torch.Tensor"):
        cai_kernels.gae(rows, rows, [[1] * T] * B)


@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_gae_discount_range(rows, rows_mask, name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number in \[0.0, 1.0\]"):
        cai_kernels.gae(rows, rows, rows_mask, **{name: bad})


def test_gae_discount_type(rows, rows_mask):
    with pytest.raises(TypeError, match="gamma must be a number"):
        cai_kernels.gae(rows, rows, rows_mask, gamma="0.9")
    with pytest.raises(TypeError, match="lam must be a number"):
        cai_kernels.gae(rows, rows, rows_mask, lam=True)


def test_gae_devices(rows, rows_mask):
    with pytest.raises(ValueError, match="response_mask must be on the same device as rewards"):
        cai_kernels.gae(rows, rows, rows_mask.to("meta"))


def test_unknown_backend(rows, rows_mask):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.gae(rows, rows, rows_mask, backend="fortran")


def test_grid_is_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import GaeParams
    from cai_kernels.triton import gae as kernels

    assert_grids_are_one_dimensional(monkeypatch, kernels, ["gae_kernel"],
                                     lambda x, m: kernels.gae_fwd(x, x, m, GaeParams(1.0, 0.95)))
