"""ppo_policy_loss: every compiled backend against the float64 reference, every aggregation mode,
dual clip, extreme log-ratios, empty masks, gradients; bad input; Triton grids."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels import reference
from cai_kernels._params import AGG_MODES
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, check_loss, logprobs, normal, response_mask
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("ppo_policy_loss", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
B, T = 3, 5  # the size of the fixtures rows and rows_mask


AGGS = tuple(AGG_MODES)


def policy_inputs(B, T, *, dtype=torch.float32, spread=0.3, kind="holes"):
    old = logprobs(B, T, dtype=dtype)
    new = (old.double() + torch.randn(B, T, dtype=torch.float64, device=DEVICE) * spread).to(dtype)
    return new, old, normal(B, T, dtype=dtype), response_mask(B, T, kind)


def check_policy(lp, old, adv, mask, backend, **kwargs):
    loss, stats, ref_stats, grad = check_loss(cai_kernels.ppo_policy_loss, reference.ppo_policy_loss, lp, old, adv,
                                              mask, backend, **kwargs)
    assert set(stats) == {"clipfrac", "dual_clipfrac", "approx_kl", "approx_kl_k1"}
    for name in stats:
        assert stats[name].shape == () and not stats[name].requires_grad
        assert_close(stats[name], ref_stats[name], msg=name)
    return loss, stats, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_policy_matches_reference(backend, agg, dual_clip, dtype):
    check_policy(*policy_inputs(6, 57, dtype=dtype), backend, agg=agg, dual_clip=dual_clip, clip_low=0.2,
                 clip_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_policy_masks(backend, kind):
    check_policy(*policy_inputs(7, 33, kind=kind), backend, agg="seq-mean-token-mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_clip_branches_by_hand(backend):
    # ratio e^0.5 = 1.65 with A > 0 is clipped to 1.2; ratio e^-0.5 = 0.61 with A < 0 is clipped to
    # 0.8; with A = -1 and ratio e^1.5 = 4.5 > c = 3, dual clip bounds the loss at 3
    lp = torch.tensor([[0.5, -0.5, 1.5, 0.0]], device=DEVICE)
    old = torch.zeros(1, 4, device=DEVICE)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], device=DEVICE)
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    loss, stats, grad = check_policy(lp, old, adv, mask, backend, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8 + 3.0 - 2.0) / 4, device=DEVICE))
    assert stats["clipfrac"].item() == pytest.approx(0.5)       # tokens 0 and 1
    assert stats["dual_clipfrac"].item() == pytest.approx(0.25)  # token 2
    assert grad[0, :3].abs().max() == 0 and grad[0, 3].item() == pytest.approx(-2.0 / 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_extreme_log_ratios(backend, dtype):
    # log-ratios of +-50 (e^50 overflows nothing once clamped to +-20 before exp)
    lp = torch.tensor([[0.0, -50.0, -25.0, -1.0]], dtype=dtype, device=DEVICE)
    old = torch.tensor([[-50.0, 0.0, -1.0, -25.0]], dtype=dtype, device=DEVICE)
    adv = torch.tensor([[1.0, -2.0, -1.0, 3.0]], dtype=dtype, device=DEVICE)
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    for dual_clip in (None, 3.0):
        loss, stats, grad = check_policy(lp, old, adv, mask, backend, dual_clip=dual_clip)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_policy_all_masked(backend, agg):
    lp, old, adv, _ = policy_inputs(3, 9)
    mask = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    loss, stats, grad = check_policy(lp, old, adv, mask, backend, agg=agg)
    assert loss.item() == 0 and all(v.item() == 0 for v in stats.values()) and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["sliced", "transposed", "mixed_dtypes", "float_mask"])
def test_policy_views(backend, view):
    lp, old, adv, mask = policy_inputs(8, 40)
    if view == "sliced":
        lp, old, adv, mask = lp[::2, 1:], old[1::2, 1:], adv[::2, :-1], mask[::2, 1:]
    elif view == "transposed":
        lp, old, adv = lp.t().contiguous().t(), old.t().contiguous().t(), adv.t().contiguous().t()
    elif view == "mixed_dtypes":
        old = old.bfloat16()
    else:
        mask = mask.float()
    check_policy(lp, old, adv, mask, backend, dual_clip=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 8, 9, 1030])
def test_policy_lengths(backend, T):
    check_policy(*policy_inputs(3, T), backend, agg="seq-mean-token-sum")


def test_policy_many_and_long_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check_policy(*policy_inputs(65536, 3), "cpu", dual_clip=3.0)
    check_policy(*policy_inputs(2, 32768), "cpu", agg="seq-mean-token-mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_policy_gradcheck(backend, agg, dual_clip):
    lp, old, adv, mask = policy_inputs(2, 7, dtype=torch.float64, spread=0.5)
    lp.requires_grad_()

    def fn(x):
        return cai_kernels.ppo_policy_loss(x, old, adv, mask, agg=agg, dual_clip=dual_clip, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, (lp,))


def test_policy_stats_are_detached_and_old_inputs_get_no_gradient():
    lp, old, adv, mask = policy_inputs(2, 6)
    old.requires_grad_()
    adv.requires_grad_()
    loss, stats = cai_kernels.ppo_policy_loss(lp.requires_grad_(), old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert not any(v.requires_grad for v in stats.values())


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 50), kind=st.sampled_from(MASK_KINDS), agg=st.sampled_from(AGGS),
       clip_low=st.floats(0.0, 0.9), clip_high=st.floats(0.0, 2.0),
       dual_clip=st.one_of(st.none(), st.floats(1.01, 10.0)), spread=st.floats(0.0, 30.0),
       dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)), backend=st.sampled_from(BACKEND_NAMES))
def test_policy_property(B, T, kind, agg, clip_low, clip_high, dual_clip, spread, dtype, backend):
    lp, old, adv, mask = policy_inputs(B, T, dtype=dtype, spread=spread, kind=kind)
    loss, stats = cai_kernels.ppo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                              dual_clip=dual_clip, agg=agg, backend=backend)
    ref_loss, ref_stats = reference.ppo_policy_loss(lp.double(), old.double(), adv.double(), mask, clip_low=clip_low,
                                                    clip_high=clip_high, dual_clip=dual_clip, agg=agg)
    assert torch.isfinite(loss)
    tol = 2e-5 * (1 + ref_loss.abs().item())
    assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for name in stats:  # a ratio within float rounding of a clip bound may count on either side
        assert_close(stats[name], ref_stats[name], rtol=1e-4, atol=2.0 / max(1, int((mask != 0).sum())))


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(clip_low=1.0), ValueError, r"clip_low must be a finite number in \[0, 1\)"),
    (dict(clip_low=-0.1), ValueError, "clip_low must be a finite number"),
    (dict(clip_low=math.nan), ValueError, "clip_low must be a finite number"),
    (dict(clip_high=-0.2), ValueError, "clip_high must be a finite number"),
    (dict(clip_high="0.2"), TypeError, "clip_high must be a number"),
    (dict(dual_clip=1.0), ValueError, r"dual_clip must be a finite number in \(1.0, inf\]"),
    (dict(dual_clip=0.5), ValueError, "dual_clip"),
    (dict(agg="mean"), ValueError, "agg must be one of"),
    (dict(agg=None), TypeError, "agg must be a str"),
])
def test_policy_loss_arguments(rows, rows_mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        cai_kernels.ppo_policy_loss(rows, rows, rows, rows_mask, **kwargs)


def test_policy_loss_shapes(rows, rows_mask):
    with pytest.raises(ValueError, match=r"advantages must have shape \(3, 5\) \(like logprobs\)"):
        cai_kernels.ppo_policy_loss(rows, rows, rows[:2], rows_mask)
    with pytest.raises(ValueError, match="old_logprobs must be on the same device as logprobs"):
        cai_kernels.ppo_policy_loss(rows, rows.to("meta"), rows, rows_mask)


def test_unknown_backend(rows, rows_mask):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.ppo_policy_loss(rows, rows, rows, rows_mask, backend="fortran")


def test_grids_are_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import Agg, PpoPolicyLossParams
    from cai_kernels.triton import _clipped_loss, ppo_policy_loss as kernels

    params = PpoPolicyLossParams(0.2, 0.2, None, Agg.TOKEN_MEAN)
    assert_grids_are_one_dimensional(monkeypatch, _clipped_loss, ["clipped_loss_fwd_kernel"],
                                     lambda x, m: kernels.ppo_policy_loss_fwd(x, x, x, m, params))
    assert_grids_are_one_dimensional(monkeypatch, _clipped_loss, ["clipped_loss_bwd_kernel"],
                                     lambda x, m: kernels.ppo_policy_loss_bwd(torch.ones(()), x, x, x, m,
                                                                              x[:, 0].contiguous(), params))
