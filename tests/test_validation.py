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


# choice_logprobs -------------------------------------------------------------------------------

CHOICE_BACKENDS = [pytest.param("reference", id="reference")] + compiled_backends("choice_logprobs", DEVICE)


@pytest.fixture
def choice():
    """Two questions (2 and 3 options), 7 tokens, logits over 11 classes."""
    targets = torch.randint(0, 11, (7,), device=DEVICE)
    option_ids = torch.tensor([0, 0, 1, 2, 3, 4, 4], device=DEVICE)
    num_options = torch.tensor([2, 3], device=DEVICE)
    return targets, option_ids, num_options, torch.randn(7, 11, device=DEVICE)


@pytest.mark.parametrize("backend", CHOICE_BACKENDS)
def test_choice_layout_errors(backend, choice):
    targets, option_ids, num_options, logits = choice
    cases = [
        (option_ids.clone().index_fill_(0, torch.tensor([3], device=DEVICE), 5), num_options,
         r"option_ids must lie in \[0, 5\) \(O = num_options.sum\(\)\); got option_ids\[3\] = 5"),
        (option_ids.clone().index_fill_(0, torch.tensor([0], device=DEVICE), -1), num_options,
         r"option_ids must lie in \[0, 5\)"),
        (option_ids.clone().index_fill_(0, torch.tensor([2], device=DEVICE), 0), num_options,
         r"every option must have at least one token; option 1 has none"),
        (option_ids, torch.tensor([2, 4], device=DEVICE), r"every option must have at least one token; option 5"),
        (option_ids, torch.tensor([2, 2], device=DEVICE), r"option_ids must lie in \[0, 4\)"),
        (option_ids, torch.tensor([5, 0], device=DEVICE), r"num_options must be >= 1 for every question; got "
                                                          r"num_options\[1\] = 0"),
    ]
    for ids, counts, message in cases:
        with pytest.raises(ValueError, match=message):
            cai_kernels.choice_logprobs(targets, ids, counts, logits=logits, backend=backend)


@pytest.mark.parametrize("backend", CHOICE_BACKENDS)
def test_choice_target_out_of_range(backend, choice):
    targets, option_ids, num_options, logits = choice
    targets[4] = 11
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, backend=backend)


def test_choice_scores_source(choice):
    targets, option_ids, num_options, logits = choice
    hidden, weight = torch.randn(7, 4, device=DEVICE), torch.randn(11, 4, device=DEVICE)
    with pytest.raises(ValueError, match="pass either logits, or hidden \\+ weight \\(\\+ bias\\), not both"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match="pass either logits"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, bias=torch.zeros(11))
    with pytest.raises(ValueError, match=r"pass logits \(N, V\), or hidden \(N, H\) with weight \(V, H\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options)
    with pytest.raises(ValueError, match="got hidden=a tensor, weight=None"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden)
    with pytest.raises(ValueError, match=r"hidden must have 2 dimensions \(N, H\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden[None], weight=weight)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits[None])
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits[:6])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden, weight=weight.double())


def test_choice_index_tensors(choice):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(TypeError, match="option_ids must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets, option_ids.int(), num_options, logits=logits)
    with pytest.raises(TypeError, match="num_options must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options.float(), logits=logits)
    with pytest.raises(TypeError, match="targets must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets.int(), option_ids, num_options, logits=logits)
    with pytest.raises(ValueError, match=r"option_ids must have shape \(7,\)"):
        cai_kernels.choice_logprobs(targets, option_ids[:6], num_options, logits=logits)
    with pytest.raises(ValueError, match="num_options must have 1 dimensions"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options[None], logits=logits)
    with pytest.raises(ValueError, match="targets must have 1 dimensions"):
        cai_kernels.choice_logprobs(targets[None], option_ids, num_options, logits=logits)
    with pytest.raises(ValueError, match="num_options must be on the same device as targets"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options.to("meta"), logits=logits)


@pytest.mark.parametrize("clamp,error,message", [
    ((0.6, 0.4), ValueError, r"clamp must satisfy 0 <= lo <= hi <= 1; got \(0.6, 0.4\)"),
    ((-0.1, 0.5), ValueError, "clamp must satisfy"),
    ((0.5, 1.5), ValueError, "clamp must satisfy"),
    ((math.nan, 0.5), ValueError, "clamp must satisfy"),
    ((0.4,), TypeError, r"clamp must be None or a pair \(lo, hi\) of numbers"),
    ("ab", TypeError, "clamp must be None or a pair"),
    (0.5, TypeError, "clamp must be None or a pair"),
    ((0.4, "0.6"), TypeError, "clamp must be None or a pair"),
])
def test_choice_clamp(choice, clamp, error, message):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(error, match=message):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, clamp=clamp)


def test_choice_temperature(choice):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, temperature=-1.0)


def test_cpu_kernel_errors_keep_their_python_types():
    """A bad value found inside a C++ kernel is a ValueError with the kernel's message (without the
    transport prefix, csrc/cpu/errors.h); any other kernel failure stays a RuntimeError."""
    from cai_kernels._extension import VALUE_ERROR_PREFIX, cpu_kernels, status

    if not status().loaded:
        pytest.fail("the C++ extension should be built in the test environment")
    logits, bad = torch.randn(2, 3, 5), torch.tensor([[0, 1, 5], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"^targets must lie in \[0, 5\)") as caught:
        cai_kernels.token_logprobs(logits, bad, backend="cpu")
    assert not str(caught.value).startswith(VALUE_ERROR_PREFIX)
    with pytest.raises(RuntimeError) as caught:  # a 2-D view where the kernel takes (outer, inner, T)
        cpu_kernels.kl_penalty_fwd(torch.zeros(2, 3), torch.zeros(2, 3), 0, -1.0, 1.0, -1.0, 1.0)
    assert not isinstance(caught.value, ValueError)
