"""ppo_policy_loss and ppo_value_loss: every compiled backend against the float64 reference, every
aggregation mode, dual clip, extreme log-ratios, empty masks, gradients."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels import reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance
from tests._ppo_inputs import DEVICE, MASK_KINDS, logprobs, normal, response_mask

BACKENDS = compiled_backends("ppo_policy_loss", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
AGGS = reference.ppo.AGG_MODES


def policy_inputs(B, T, *, dtype=torch.float32, spread=0.3, kind="holes"):
    old = logprobs(B, T, dtype=dtype)
    new = (old.double() + torch.randn(B, T, dtype=torch.float64, device=DEVICE) * spread).to(dtype)
    return new, old, normal(B, T, dtype=dtype), response_mask(B, T, kind)


def check_policy(lp, old, adv, mask, backend, **kwargs):
    leaf = lp.detach().requires_grad_()
    loss, stats = cai_kernels.ppo_policy_loss(leaf, old, adv, mask, backend=backend, **kwargs)
    acc = torch.float64 if lp.dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc
    assert set(stats) == {"clipfrac", "dual_clipfrac", "approx_kl", "approx_kl_k1"}
    ref_leaf = lp.detach().double().requires_grad_()
    ref_loss, ref_stats = reference.ppo_policy_loss(ref_leaf, old.double(), adv.double(), mask, **kwargs)
    assert_close(loss, ref_loss, msg="loss")
    for name in stats:
        assert stats[name].shape == () and not stats[name].requires_grad
        assert_close(stats[name], ref_stats[name], msg=name)
    loss.backward()
    ref_loss.backward()
    assert leaf.grad.dtype == lp.dtype
    assert_close(leaf.grad, ref_leaf.grad, **grad_tolerance(lp.dtype), msg="gradient")
    assert torch.all(leaf.grad[mask == 0] == 0)
    return loss, stats, leaf.grad


def check_value(v, old, ret, mask, backend, **kwargs):
    leaf = v.detach().requires_grad_()
    loss, clipfrac = cai_kernels.ppo_value_loss(leaf, old, ret, mask, backend=backend, **kwargs)
    assert loss.shape == clipfrac.shape == () and not clipfrac.requires_grad
    ref_leaf = v.detach().double().requires_grad_()
    ref_loss, ref_clipfrac = reference.ppo_value_loss(ref_leaf, old.double(), ret.double(), mask, **kwargs)
    assert_close(loss, ref_loss, msg="loss")
    assert_close(clipfrac, ref_clipfrac, msg="clipfrac")
    loss.backward()
    ref_loss.backward()
    assert leaf.grad.dtype == v.dtype
    assert_close(leaf.grad, ref_leaf.grad, **grad_tolerance(v.dtype), msg="gradient")
    assert torch.all(leaf.grad[mask == 0] == 0)
    return loss, clipfrac, leaf.grad


# ---- policy loss ---------------------------------------------------------------------------------

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


# ---- value loss ----------------------------------------------------------------------------------

def value_inputs(B, T, *, dtype=torch.float32, kind="holes"):
    old = normal(B, T, dtype=dtype)
    values = (old.double() + torch.randn(B, T, dtype=torch.float64, device=DEVICE) * 0.3).to(dtype)
    return values, old, normal(B, T, dtype=dtype), response_mask(B, T, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_value_matches_reference(backend, agg, clip, dtype):
    check_value(*value_inputs(6, 57, dtype=dtype), backend, agg=agg, clip=clip)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_value_masks(backend, kind):
    check_value(*value_inputs(7, 33, kind=kind), backend, agg="seq-mean-token-sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_clip_by_hand(backend):
    # value 1.0 moved from old 0.0 (clip 0.2 -> 0.2); return 2.0: clipped error 1.8 > 1.0, so the
    # clipped term is taken and passes no gradient; the second token stays within the clip range
    values = torch.tensor([[1.0, 0.1]], device=DEVICE)
    old = torch.zeros(1, 2, device=DEVICE)
    returns = torch.tensor([[2.0, 0.5]], device=DEVICE)
    mask = torch.ones(1, 2, dtype=torch.bool, device=DEVICE)
    loss, clipfrac, grad = check_value(values, old, returns, mask, backend)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.8 ** 2 + 0.4 ** 2) / 2, device=DEVICE))
    assert clipfrac.item() == pytest.approx(0.5)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.4 / 2]], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_all_masked_and_views(backend):
    values, old, returns, _ = value_inputs(3, 9)
    loss, clipfrac, grad = check_value(values, old, returns, torch.zeros(3, 9, dtype=torch.int64, device=DEVICE),
                                       backend)
    assert loss.item() == 0 and clipfrac.item() == 0 and not grad.any()
    values, old, returns, mask = value_inputs(8, 30)
    check_value(values[::2, 1:], old[1::2, 1:], returns.bfloat16()[::2, 1:], mask[::2, 1:], backend)


def test_value_many_and_long_rows_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    check_value(*value_inputs(65536, 3), "cpu")
    check_value(*value_inputs(2, 32768), "cpu", agg="seq-mean-token-mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_gradcheck(backend, clip):
    values, old, returns, mask = value_inputs(2, 7, dtype=torch.float64)
    values.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: cai_kernels.ppo_value_loss(v, old, returns, mask, clip=clip, agg="seq-mean-token-mean",
                                             backend=backend)[0], (values,))
