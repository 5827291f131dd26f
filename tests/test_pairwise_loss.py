"""pairwise_loss: every compiled backend against the float64 reference; bad input."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import pairwise_loss as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance
from tests._preference import DEVICE, FP32_TOL, REDUCTIONS, random_rewards

BACKENDS = compiled_backends("pairwise_loss", DEVICE)


def as_double(value):
    return value.detach().double() if isinstance(value, torch.Tensor) else value


def check_forward_backward(chosen, rejected, backend, *, soft_labels=None, margin=None, reduction="mean",
                           loss_tol=None):
    """Loss and the gradients of a weighted sum of it w.r.t. both rewards, each against the reference
    evaluated in float64 on the very values the kernel saw."""
    chosen_leaf = chosen.detach().requires_grad_()
    rejected_leaf = rejected.detach().requires_grad_()
    loss = cai_kernels.pairwise_loss(chosen_leaf, rejected_leaf, soft_labels=soft_labels, margin=margin,
                                     reduction=reduction, backend=backend)
    assert loss.dtype == (torch.float64 if chosen.dtype == torch.float64 else torch.float32)
    assert loss.shape == (chosen.shape if reduction == "none" else ())

    ref_chosen = chosen.detach().double().requires_grad_()
    ref_rejected = rejected.detach().double().requires_grad_()
    ref_loss = reference(ref_chosen, ref_rejected, soft_labels=as_double(soft_labels), margin=as_double(margin),
                         reduction=reduction)
    assert_close(loss, ref_loss, **(loss_tol or FP32_TOL), msg="loss")

    weights = torch.rand_like(ref_loss) + 0.5
    (loss * weights.to(loss.dtype)).sum().backward()
    (ref_loss * weights).sum().backward()
    assert chosen_leaf.grad.dtype == chosen.dtype and rejected_leaf.grad.dtype == rejected.dtype
    tol = FP32_TOL if chosen.dtype in (torch.float32, torch.float64) else grad_tolerance(chosen.dtype)
    assert_close(chosen_leaf.grad, ref_chosen.grad, **tol, msg="gradient w.r.t. chosen")
    assert_close(rejected_leaf.grad, ref_rejected.grad, **tol, msg="gradient w.r.t. rejected")
    return loss, chosen_leaf.grad, rejected_leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, dtype, reduction):
    chosen, rejected = random_rewards(1037, dtype=dtype), random_rewards(1037, dtype=dtype)
    check_forward_backward(chosen, rejected, backend, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_labels_and_margins(backend, reduction):
    chosen, rejected = random_rewards(257), random_rewards(257)
    labels = torch.rand(257, device=DEVICE)
    labels[:3] = torch.tensor([0.0, 0.5, 1.0])
    margin = torch.rand(257, device=DEVICE)
    check_forward_backward(chosen, rejected, backend, soft_labels=labels, margin=margin, reduction=reduction)
    check_forward_backward(chosen, rejected, backend, soft_labels=0.3, margin=-1.25, reduction=reduction)
    check_forward_backward(chosen, rejected, backend, soft_labels=labels.double(), margin=2, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", [0.0, 0.5, 1.0])
def test_label_extremes_are_exact_cross_entropies(backend, label):
    chosen, rejected = random_rewards(64), random_rewards(64)
    loss, _, _ = check_forward_backward(chosen, rejected, backend, soft_labels=torch.full((64,), label, device=DEVICE),
                                        reduction="none")
    d = (chosen - rejected).double()
    expected = {0.0: torch.nn.functional.softplus(d), 1.0: torch.nn.functional.softplus(-d),
                0.5: 0.5 * (torch.nn.functional.softplus(d) + torch.nn.functional.softplus(-d))}[label]
    assert_close(loss, expected, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_labels_and_margins_over_nd_rewards(backend):
    chosen, rejected = random_rewards(6, 5), random_rewards(6, 5)
    labels = torch.rand(6, 1, device=DEVICE)                    # one label per row of five pairs
    margin = torch.rand(5, device=DEVICE)                       # one margin per column
    check_forward_backward(chosen, rejected, backend, soft_labels=labels, margin=margin, reduction="none")
    check_forward_backward(chosen, rejected, backend, soft_labels=torch.tensor(0.8, device=DEVICE),
                           margin=torch.tensor([0.5], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["column_of_scores", "transpose", "expanded"])
def test_non_contiguous_rewards(backend, view):
    if view == "column_of_scores":       # what a (B, 1) value head or a (B, 2) pair of scores hands over
        scores = random_rewards(300, 2)
        chosen, rejected = scores[:, 0], scores[:, 1]
    elif view == "transpose":
        chosen, rejected = random_rewards(7, 9).t(), random_rewards(7, 9).t()
    else:
        chosen, rejected = random_rewards(1, 8).expand(5, 8), random_rewards(5, 8)
    assert not chosen.is_contiguous()
    check_forward_backward(chosen, rejected, backend, soft_labels=torch.rand(chosen.shape, device=DEVICE),
                           reduction="none")
    check_forward_backward(chosen, rejected, backend, margin=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_differences_are_finite_with_the_right_asymptotics(backend, dtype):
    # |d| up to 1e4: -logsigmoid(d) = softplus(-d) is ~|d| on the wrong side and ~0 on the right one;
    # log(sigmoid(d)) would give -inf, log1p(exp(-d)) overflows.
    big = torch.tensor([1e4, -1e4, 88.0, -88.0, 104.0, -104.0, 2e3, -2e3], dtype=dtype, device=DEVICE)
    chosen, rejected = big, torch.zeros_like(big)
    d = big.double()
    for label in (0.0, 0.5, 1.0, 0.25):
        labels = torch.full_like(d, label, dtype=torch.float32)
        loss, grad_chosen, grad_rejected = check_forward_backward(chosen, rejected, backend, soft_labels=labels,
                                                                  reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad_chosen).all() and torch.isfinite(grad_rejected).all()
        # loss ~ p relu(-d) + (1 - p) relu(d); the rest is log1p(e^-|d|) < 1e-38 here
        expected = label * torch.relu(-d) + (1 - label) * torch.relu(d)
        assert_close(loss, expected, rtol=1e-6, atol=1e-30)
    loss = cai_kernels.pairwise_loss(chosen, rejected, reduction="none", backend=backend)
    assert loss[0] == 0 and loss[1] == -big[1].float(), "hard labels: right side costs nothing, wrong side |d|"
    leaf = chosen.detach().requires_grad_()
    cai_kernels.pairwise_loss(leaf, rejected, reduction="sum", backend=backend).backward()
    assert leaf.grad[0] == 0 and leaf.grad[1] == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_rewards_of_large_magnitude(backend):
    # bf16 rewards whose difference is far beyond what fp16 / a naive exp could hold
    chosen = torch.tensor([2.0**14, -2.0**14, 1.0e3, 7.5], dtype=torch.bfloat16, device=DEVICE)
    rejected = torch.tensor([-2.0**14, 2.0**14, 1.0e3, -7.5], dtype=torch.bfloat16, device=DEVICE)
    loss, grad_chosen, _ = check_forward_backward(chosen, rejected, backend, soft_labels=torch.tensor(
        [1.0, 1.0, 0.5, 0.0], device=DEVICE), reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad_chosen).all()
    assert loss[1] == 2.0**15 and loss[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_only_its_pair(backend):
    chosen, rejected = random_rewards(40), random_rewards(40)
    chosen[17] = math.nan
    loss = cai_kernels.pairwise_loss(chosen, rejected, reduction="none", backend=backend)
    assert torch.isnan(loss[17]) and torch.isfinite(loss[torch.arange(40, device=DEVICE) != 17]).all()
    assert torch.isnan(cai_kernels.pairwise_loss(chosen, rejected, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_and_margins_get_no_gradient(backend):
    chosen, rejected = random_rewards(9).requires_grad_(), random_rewards(9).requires_grad_()
    labels = torch.rand(9, device=DEVICE, requires_grad=True)
    margin = torch.rand(9, device=DEVICE, requires_grad=True)
    cai_kernels.pairwise_loss(chosen, rejected, soft_labels=labels, margin=margin, backend=backend).backward()
    assert labels.grad is None and margin.grad is None
    assert chosen.grad is not None and rejected.grad is not None
    assert_close(chosen.grad, -rejected.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_empty_batch(backend, reduction):
    empty = torch.empty(0, device=DEVICE)
    loss = cai_kernels.pairwise_loss(empty, empty, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ()) and (reduction == "none" or loss == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_rewards(backend):
    check_forward_backward(random_rewards(), random_rewards(), backend, soft_labels=0.7, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    chosen = torch.randn(11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rejected = torch.randn(11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.rand(11, dtype=torch.float64, device=DEVICE)
    margin = torch.randn(11, dtype=torch.float64, device=DEVICE)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda c, r: cai_kernels.pairwise_loss(c, r, soft_labels=labels, margin=margin, reduction=reduction,
                                                   backend=backend), (chosen, rejected))
    assert torch.autograd.gradcheck(
        lambda c, r: cai_kernels.pairwise_loss(c, r, soft_labels=0.2, margin=0.3, backend=backend), (chosen, rejected))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_large_batch(reduction):
    # 2^16 + odd rows: many blocks, both threads, a ragged last block; the reductions keep 1e-6 accuracy
    if DEVICE.type != "cpu":
        pytest.skip("the C++ backend runs on CPU tensors")
    n = 65536 + 4465
    chosen, rejected = random_rewards(n, scale=5.0), random_rewards(n, scale=5.0)
    labels = torch.rand(n, device=DEVICE)
    leaf = chosen.detach().requires_grad_()
    loss = cai_kernels.pairwise_loss(leaf, rejected, soft_labels=labels, margin=0.25, reduction=reduction,
                                     backend="cpu")
    ref_leaf = chosen.detach().double().requires_grad_()
    ref = reference(ref_leaf, rejected.double(), soft_labels=labels.double(), margin=0.25, reduction=reduction)
    assert_close(loss, ref, **FP32_TOL)
    loss.sum().backward()
    ref.sum().backward()
    scale = n if reduction == "mean" else 1  # compare mean gradients at the size of one pair's
    assert_close(leaf.grad * scale, ref_leaf.grad * scale, **FP32_TOL)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=2),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    scale=st.sampled_from([0.0, 1.0, 30.0, 1e3]),
    labels=st.sampled_from(["none", "float", "tensor"]),
    use_margin=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(shape, dtype, scale, labels, use_margin, reduction, backend):
    if reduction == "mean" and math.prod(shape) == 0:
        reduction = "sum"
    chosen, rejected = random_rewards(*shape, dtype=dtype, scale=scale), random_rewards(*shape, dtype=dtype, scale=scale)
    soft_labels = {"none": None, "float": 0.35, "tensor": torch.rand(shape, device=DEVICE)}[labels]
    margin = torch.randn(shape, device=DEVICE) if use_margin else None
    loss = cai_kernels.pairwise_loss(chosen, rejected, soft_labels=soft_labels, margin=margin, reduction=reduction,
                                     backend=backend)
    ref = reference(chosen.double(), rejected.double(), soft_labels=as_double(soft_labels),
                    margin=as_double(margin), reduction=reduction)
    # d is formed in fp32 from the rounded inputs: its rounding is relative to |chosen| + |rejected|
    tol = 1e-6 * (1 + scale)
    assert_close(loss, ref, rtol=tol, atol=tol)
    assert torch.isfinite(loss).all()


def test_backends_agree_with_each_other():
    chosen, rejected = random_rewards(999, dtype=torch.bfloat16), random_rewards(999, dtype=torch.bfloat16)
    labels = torch.rand(999, device=DEVICE)
    outs = [cai_kernels.pairwise_loss(chosen, rejected, soft_labels=labels, reduction="none", backend=p.values[0])
            for p in BACKENDS]
    for out in outs[1:]:
        assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


def rewards(*shape):
    return torch.randn(shape, device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [1.5, -0.01, math.nan])
def test_soft_label_out_of_range_is_a_value_error(backend, bad):
    labels = torch.rand(2, 3, device=DEVICE)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=r"soft_labels must lie in \[0, 1\]; got .* for pair 5"):
        cai_kernels.pairwise_loss(rewards(2, 3), rewards(2, 3), soft_labels=labels, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_broadcast_soft_label_out_of_range_names_the_first_pair(backend):
    with pytest.raises(ValueError, match=r"soft_labels must lie in \[0, 1\]; got 2(\.0)? for pair 0"):
        cai_kernels.pairwise_loss(rewards(4), rewards(4), soft_labels=torch.tensor(2.0, device=DEVICE),
                                  backend=backend)


@pytest.mark.parametrize("value", [1.01, -0.5, math.nan, math.inf])
def test_float_soft_label_out_of_range(value):
    with pytest.raises(ValueError, match=r"soft_labels must be a number in \[0, 1\]"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), soft_labels=value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_float_margin_must_be_finite(value):
    with pytest.raises(ValueError, match="margin must be a finite number"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), margin=value)


@pytest.mark.parametrize("name", ["soft_labels", "margin"])
def test_label_and_margin_types(name):
    with pytest.raises(TypeError, match=f"{name} must be a float, a torch.Tensor or None; got str"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), **{name: "high"})
    with pytest.raises(TypeError, match=f"{name} must have dtype"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), **{name: torch.ones(3, dtype=torch.long, device=DEVICE)})
    with pytest.raises(TypeError, match=f"{name} must be a float"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), **{name: True})


@pytest.mark.parametrize("name", ["soft_labels", "margin"])
@pytest.mark.parametrize("shape", [(4,), (2, 3), (3, 1)])
def test_label_and_margin_must_broadcast_to_the_rewards(name, shape):
    with pytest.raises(ValueError, match=rf"{name} must be broadcastable to the rewards' shape \(3,\)"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), **{name: torch.rand(shape, device=DEVICE)})


def test_label_and_margin_devices():
    with pytest.raises(ValueError, match="soft_labels must be on the same device as the rewards"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), soft_labels=torch.rand(3, device="meta"))


def test_rewards_types_shapes_devices():
    with pytest.raises(TypeError, match="chosen_rewards must be a torch.Tensor; got list"):
        cai_kernels.pairwise_loss([1.0], rewards(1))
    with pytest.raises(TypeError, match="rejected_rewards must have dtype"):
        cai_kernels.pairwise_loss(rewards(3), torch.ones(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match=r"rejected_rewards must have the dtype of chosen_rewards \(torch.float32\)"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3).bfloat16())
    with pytest.raises(ValueError, match=r"rejected_rewards must have shape \(3,\)"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3, 1))
    with pytest.raises(ValueError, match="rejected_rewards must be on the same device as chosen_rewards"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3).to("meta"))


def test_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'sum', 'mean'\); got 'avg'"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), reduction="avg")
    with pytest.raises(TypeError, match="reduction must be a str"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), reduction=None)
    with pytest.raises(ValueError, match="at least one pair for reduction='mean'"):
        cai_kernels.pairwise_loss(rewards(0), rewards(0))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        cai_kernels.pairwise_loss(rewards(3), rewards(3), backend="fortran")
