"""Bad input to the public ops: a TypeError / ValueError naming the argument, never a crash or garbage."""

import math

import pytest
import torch

import cai_kernels
from tests._backends import compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = [pytest.param("reference", id="reference")] + compiled_backends("token_logprobs", DEVICE)


@pytest.fixture
def logits():
    return torch.randn(2, 3, 11, device=DEVICE)


@pytest.fixture
def targets():
    return torch.randint(0, 11, (2, 3), device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_value", [11, -1, 10**12])
def test_target_out_of_range_is_a_value_error(backend, logits, targets, bad_value):
    targets[1, 2] = bad_value
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.token_logprobs(logits, targets, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_other_than_ignore_index_still_caught(backend, logits, targets):
    targets[0, 0] = -100
    targets[1, 1] = 11
    with pytest.raises(ValueError, match="targets"):
        cai_kernels.token_logprobs(logits, targets, ignore_index=-100, backend=backend)


def test_targets_dtype_is_a_type_error(logits, targets):
    with pytest.raises(TypeError, match=r"targets must be int64 with shape \(2, 3\).*torch.int32"):
        cai_kernels.token_logprobs(logits, targets.int())


def test_targets_shape_mismatch(logits):
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        cai_kernels.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE))


def test_logits_must_be_floating(targets):
    with pytest.raises(TypeError, match="logits must have dtype"):
        cai_kernels.token_logprobs(torch.zeros(2, 3, 11, dtype=torch.long, device=DEVICE), targets)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        cai_kernels.token_logprobs([[0.0]], targets)


def test_empty_vocabulary(targets):
    with pytest.raises(ValueError, match="non-empty last"):
        cai_kernels.token_logprobs(torch.zeros(2, 3, 0, device=DEVICE), targets)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive_and_finite(logits, targets, temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cai_kernels.token_logprobs(logits, targets, temperature=temperature)


def test_temperature_type(logits, targets):
    with pytest.raises(TypeError, match="temperature must be a number"):
        cai_kernels.token_logprobs(logits, targets, temperature="hot")


def test_ignore_index_type(logits, targets):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cai_kernels.token_logprobs(logits, targets, ignore_index=1.5)


def test_devices_must_match(logits, targets):
    with pytest.raises(ValueError, match="targets must be on the same device as logits"):
        cai_kernels.token_logprobs(logits, targets.to("meta"))


def test_unknown_backend(logits, targets):
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.token_logprobs(logits, targets, backend="fortran")


# linear_token_logprobs -------------------------------------------------------------------------

LINEAR_BACKENDS = [pytest.param("reference", id="reference")] + compiled_backends("linear_token_logprobs", DEVICE)


@pytest.fixture
def head():
    """hidden (2, 3, 8), weight (11, 8), bias (11,)."""
    return torch.randn(2, 3, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE), torch.randn(11, device=DEVICE)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("bad_value", [11, -1, 10**12])
def test_linear_target_out_of_range_is_a_value_error(backend, head, targets, bad_value):
    hidden, weight, bias = head
    targets[1, 2] = bad_value
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    targets[0, 0] = -100
    with pytest.raises(ValueError, match="targets"):
        cai_kernels.linear_token_logprobs(hidden, weight, targets, ignore_index=-100, backend=backend)


def test_linear_operand_types(head, targets):
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


def test_linear_operand_shapes(head, targets):
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


def test_linear_scalars_and_devices(head, targets):
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
