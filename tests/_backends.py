"""Which compiled backends the tests exercise here, and the tolerances every comparison shares."""

from __future__ import annotations

import pytest
import torch

from cai_kernels import _registry

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def compiled_backends(op: str, device: torch.device) -> list:
    """Every non-reference backend, as pytest params; one that cannot run here is a *failure* when the
    machine should have it (the C++ extension on CPU, Triton everywhere in the test environment)."""
    return [pytest.param(b, id=b) for b in _registry.BACKENDS if b != "reference"
            and (b != "cpu" or device.type == "cpu")]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 2e-5, atol: float = 2e-5,
                 msg: str = "") -> None:
    """Compare in float64 on the CPU (an expected value written as a CPU literal checks a CUDA result
    too); NaN must match NaN and infinities must match exactly."""
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def grad_tolerance(dtype: torch.dtype) -> dict:
    """Gradients come back in the input dtype: one rounding to it on top of fp32 compute."""
    if dtype == torch.bfloat16:
        return {"rtol": 1e-2, "atol": 1e-9}
    if dtype == torch.float16:  # p ~ 1/V is subnormal in fp16: absolute steps of 6e-8
        return {"rtol": 2e-3, "atol": 1e-7}
    return {"rtol": 1e-4, "atol": 1e-8}
