"""ranked_pairwise_loss: every compiled backend against the explicit K x K reference; bad input."""

import itertools

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import ranked_pairwise_loss as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance
from tests._preference import DEVICE, FP32_TOL, REDUCTIONS, random_rewards

BACKENDS = compiled_backends("ranked_pairwise_loss", DEVICE)


def check_forward_backward(rewards, backend, *, num_valid=None, reduction="mean"):
    leaf = rewards.detach().requires_grad_()
    loss = cai_kernels.ranked_pairwise_loss(leaf, num_valid=num_valid, reduction=reduction, backend=backend)
    assert loss.dtype == (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    ref_leaf = rewards.detach().double().requires_grad_()
    ref = reference(ref_leaf, num_valid=num_valid, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref, **FP32_TOL, msg="loss")
    weights = torch.rand_like(ref) + 0.5
    (loss * weights.to(loss.dtype)).sum().backward()
    (ref * weights).sum().backward()
    assert leaf.grad.dtype == rewards.dtype
    tol = FP32_TOL if rewards.dtype in (torch.float32, torch.float64) else grad_tolerance(rewards.dtype)
    assert_close(leaf.grad, ref_leaf.grad, **tol, msg="gradient")
    return loss, leaf.grad


def test_reference_is_the_mean_over_ranked_pairs():
    # the K x K reference against a plain loop over the pairs of each row
    rewards, num_valid = random_rewards(5, 6, dtype=torch.float64), torch.tensor([6, 4, 1, 0, 2], device=DEVICE)
    rows = []
    for row, n in zip(rewards, num_valid.tolist()):
        pairs = [-F.logsigmoid(row[i] - row[j]) for i, j in itertools.combinations(range(n), 2)]
        rows.append(torch.stack(pairs).mean() if pairs else row.new_zeros(()))
    rows = torch.stack(rows)
    assert_close(reference(rewards, num_valid=num_valid, reduction="none"), rows, rtol=1e-12, atol=1e-12)
    assert_close(reference(rewards, num_valid=num_valid), rows[num_valid >= 2].mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, dtype, reduction):
    check_forward_backward(random_rewards(9, 7, dtype=dtype), backend, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_num_valid_including_rows_without_pairs(backend, reduction):
    rewards = random_rewards(8, 5)
    num_valid = torch.tensor([5, 0, 1, 2, 3, 4, 5, 2], device=DEVICE)
    loss, grad = check_forward_backward(rewards, backend, num_valid=num_valid, reduction=reduction)
    assert torch.all(grad[1] == 0) and torch.all(grad[2] == 0), "rows without a pair get no gradient"
    assert torch.all(grad[3, 2:] == 0) and torch.all(grad[4, 3:] == 0), "padding responses get no gradient"
    for dtype in (torch.int32, torch.int16):
        check_forward_backward(rewards, backend, num_valid=num_valid.to(dtype), reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_pair_anywhere_is_zero_not_nan(backend):
    rewards = random_rewards(3, 4)
    loss = cai_kernels.ranked_pairwise_loss(rewards, num_valid=torch.tensor([1, 0, 1], device=DEVICE),
                                            backend=backend)
    assert loss == 0
    assert cai_kernels.ranked_pairwise_loss(random_rewards(4, 1), backend=backend) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_responses_is_the_pairwise_loss(backend):
    rewards = random_rewards(50, 2)
    assert_close(cai_kernels.ranked_pairwise_loss(rewards, reduction="none", backend=backend),
                 cai_kernels.pairwise_loss(rewards[:, 0], rewards[:, 1], reduction="none", backend="reference"),
                 **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 16, 17, 130])
def test_response_counts_and_block_edges(backend, K):
    num_valid = torch.randint(0, K + 1, (2,), device=DEVICE)
    num_valid[0] = K
    check_forward_backward(random_rewards(2, K), backend, num_valid=num_valid, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_rewards_stay_finite(backend):
    rewards = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], device=DEVICE)
    loss, grad = check_forward_backward(rewards, backend, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # row 1: pairs (0 above 1) costs 2e4, (0 above 2) 1.5e4, (1 above 2) 0 -> mean 35000 / 3
    assert_close(loss[1], torch.tensor(35000.0 / 3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_rewards(backend):
    rewards = random_rewards(6, 9).t()           # (9, 6) with strides (1, 9)
    check_forward_backward(rewards, backend, num_valid=torch.randint(0, 7, (9,), device=DEVICE))
    check_forward_backward(random_rewards(9, 12)[:, ::2], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    rewards = random_rewards(4, 5, dtype=torch.float64).requires_grad_()
    num_valid = torch.tensor([5, 3, 1, 4], device=DEVICE)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda r: cai_kernels.ranked_pairwise_loss(r, num_valid=num_valid, reduction=reduction, backend=backend),
            (rewards,), fast_mode=backend == "triton")  # the interpreter is slow: random projections there


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_large_batch(reduction):
    if DEVICE.type != "cpu":
        pytest.skip("the C++ backend runs on CPU tensors")
    B, K = 65536 + 77, 4
    num_valid = torch.randint(0, K + 1, (B,), device=DEVICE)
    check_forward_backward(random_rewards(B, K), "cpu", num_valid=num_valid, reduction=reduction)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 6),
    K=st.integers(1, 20),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    scale=st.sampled_from([0.0, 1.0, 50.0]),
    use_num_valid=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(batch, K, dtype, scale, use_num_valid, reduction, backend):
    rewards = random_rewards(batch, K, dtype=dtype, scale=scale)
    num_valid = torch.randint(0, K + 1, (batch,), device=DEVICE) if use_num_valid else None
    loss = cai_kernels.ranked_pairwise_loss(rewards, num_valid=num_valid, reduction=reduction, backend=backend)
    ref = reference(rewards.double(), num_valid=num_valid, reduction=reduction)
    tol = 1e-6 * (1 + scale)
    assert_close(loss, ref, rtol=tol, atol=tol)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


def rewards(*shape):
    return torch.randn(shape, device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 5])
def test_num_valid_out_of_range(backend, bad):
    num_valid = torch.tensor([4, bad, 2], device=DEVICE)
    with pytest.raises(ValueError, match=rf"num_valid must lie in \[0, 4\] \(K = rewards.size\(1\)\); "
                                         rf"got num_valid\[1\] = {bad}"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), num_valid=num_valid, backend=backend)


def test_arguments():
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        cai_kernels.ranked_pairwise_loss(rewards(4))
    with pytest.raises(TypeError, match="num_valid must have an integer dtype"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), num_valid=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="num_valid must be a torch.Tensor or None"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), num_valid=[1, 2, 3])
    with pytest.raises(ValueError, match=r"num_valid must have shape \(3,\)"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), num_valid=torch.ones(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), reduction="max")
