"""ppo_value_loss: every compiled backend against the float64 reference, every aggregation mode,
clip or none, empty masks, gradients; bad input; Triton grids."""

import math

import pytest
import torch

import cai_kernels
from cai_kernels import reference
from cai_kernels._params import AGG_MODES
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, check_loss, normal, response_mask
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("ppo_value_loss", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
B, T = 3, 5  # the size of the fixtures rows and rows_mask


AGGS = tuple(AGG_MODES)


def value_inputs(B, T, *, dtype=torch.float32, kind="holes"):
    old = normal(B, T, dtype=dtype)
    values = (old.double() + torch.randn(B, T, dtype=torch.float64, device=DEVICE) * 0.3).to(dtype)
    return values, old, normal(B, T, dtype=dtype), response_mask(B, T, kind)


def check_value(v, old, ret, mask, backend, **kwargs):
    loss, clipfrac, ref_clipfrac, grad = check_loss(cai_kernels.ppo_value_loss, reference.ppo_value_loss, v, old, ret,
                                                    mask, backend, **kwargs)
    assert clipfrac.shape == () and not clipfrac.requires_grad
    assert_close(clipfrac, ref_clipfrac, msg="clipfrac")
    return loss, clipfrac, grad


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


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(clip=-0.2), ValueError, "clip must be a finite number"),
    (dict(clip=math.inf), ValueError, "clip must be a finite number"),
    (dict(clip="rows"), TypeError, "clip must be a number"),
    (dict(agg="sum"), ValueError, "agg must be one of"),
])
def test_value_loss_arguments(rows, rows_mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        cai_kernels.ppo_value_loss(rows, rows, rows, rows_mask, **kwargs)


def test_value_loss_shapes(rows, rows_mask):
    with pytest.raises(ValueError, match=r"returns must have shape \(3, 5\) \(like values\)"):
        cai_kernels.ppo_value_loss(rows, rows, rows[:, :2], rows_mask)
    with pytest.raises(TypeError, match="values must have dtype"):
        cai_kernels.ppo_value_loss(rows.int(), rows, rows, rows_mask)


def test_unknown_backend(rows, rows_mask):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.ppo_value_loss(rows, rows, rows, rows_mask, backend="fortran")


def test_grids_are_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import Agg, PpoValueLossParams
    from cai_kernels.triton import _clipped_loss, ppo_value_loss as kernels

    params = PpoValueLossParams(0.2, Agg.TOKEN_MEAN)
    assert_grids_are_one_dimensional(monkeypatch, _clipped_loss, ["clipped_loss_fwd_kernel"],
                                     lambda x, m: kernels.ppo_value_loss_fwd(x, x, x, m, params))
    assert_grids_are_one_dimensional(monkeypatch, _clipped_loss, ["clipped_loss_bwd_kernel"],
                                     lambda x, m: kernels.ppo_value_loss_bwd(torch.ones(()), x, x, x, m,
                                                                             x[:, 0].contiguous(), params))
