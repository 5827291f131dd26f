"""masked_whiten: every compiled backend against the float64 reference, on every mask shape; bad
input; Triton grids."""

import math

import pytest
import torch

import cai_kernels
from cai_kernels import reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends
from tests._ppo_inputs import DEVICE, MASK_KINDS, normal, response_mask
from tests._triton_launch import assert_grids_are_one_dimensional

BACKENDS = compiled_backends("masked_whiten", DEVICE)
BACKEND_NAMES = [p.values[0] for p in BACKENDS]
B, T = 3, 5  # the size of the fixtures rows and rows_mask


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


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

@pytest.mark.parametrize("eps", [0.0, -1e-8, math.inf])
def test_whiten_eps(rows, rows_mask, eps):
    with pytest.raises(ValueError, match="eps must be a finite number in"):
        cai_kernels.masked_whiten(rows, rows_mask, eps=eps)


def test_whiten_flags_and_shapes(rows, rows_mask):
    with pytest.raises(TypeError, match="shift_mean must be a bool"):
        cai_kernels.masked_whiten(rows, rows_mask, shift_mean=1)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        cai_kernels.masked_whiten(rows, rows_mask, unbiased="yes")
    with pytest.raises(ValueError, match=r"response_mask must have shape \(3, 5\)"):
        cai_kernels.masked_whiten(rows, rows_mask.t())
    with pytest.raises(TypeError, match="eps must be a number"):
        cai_kernels.masked_whiten(rows, rows_mask, eps=None)


def test_unknown_backend(rows, rows_mask):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.masked_whiten(rows, rows_mask, backend="fortran")


def test_grids_are_one_dimensional_beyond_65535(monkeypatch):
    from cai_kernels._params import MaskedWhitenParams
    from cai_kernels.triton import _whiten, masked_whiten as kernels

    assert_grids_are_one_dimensional(monkeypatch, kernels, ["row_moments_kernel"],
                                     lambda x, m: kernels.masked_whiten_fwd(x, m, MaskedWhitenParams(True, True, 1e-8)),
                                     persistent=(_whiten, ["whiten_kernel"]))
