"""reward_ranked_loss: every compiled backend against the float64 reference, padding responses
included; bad input."""

import pytest
import torch

import cai_kernels
from cai_kernels.reference import reward_ranked_loss as reference
from tests._backends import assert_close, compiled_backends, grad_tolerance
from tests._preference import DEVICE, FP32_TOL

BACKENDS = compiled_backends("reward_ranked_loss", DEVICE)


def hidden_and_masks(B, K, T, H, num_valid, dtype=torch.float32):
    hidden = torch.randn(B, K, T, H, dtype=torch.float64).to(dtype).to(DEVICE)
    lengths = torch.randint(1, T + 1, (B, K))
    mask = (torch.arange(T)[None, None, :] < lengths[..., None]).to(torch.int64)
    for b, n in enumerate(num_valid.tolist()):
        mask[b, n:] = 0                          # padding responses: no real token at all
    return hidden, mask.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, dtype):
    B, K, T, H = 4, 5, 7, 24
    num_valid = torch.tensor([5, 2, 0, 3], device=DEVICE)
    hidden, mask = hidden_and_masks(B, K, T, H, num_valid, dtype)
    weight, bias = torch.randn(1, H, device=DEVICE) / H ** 0.5, torch.randn((), device=DEVICE)
    leaf, w, b = hidden.detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss, rewards = cai_kernels.reward_ranked_loss(leaf, mask, w, b, num_valid=num_valid, backend=backend)
    ref_leaf, ref_w, ref_b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref_loss, ref_rewards = reference(ref_leaf, mask, ref_w, ref_b, num_valid=num_valid)
    assert_close(loss, ref_loss, **FP32_TOL)
    assert_close(rewards, ref_rewards, **FP32_TOL)
    assert torch.all(rewards[2] == 0) and torch.all(rewards[1, 2:] == 0), "padding responses have reward 0"
    loss.backward()
    ref_loss.backward()
    hidden_tol = FP32_TOL if dtype == torch.float32 else grad_tolerance(dtype)
    assert_close(leaf.grad, ref_leaf.grad, **hidden_tol)
    assert_close(w.grad, ref_w.grad, **FP32_TOL)
    assert_close(b.grad, ref_b.grad, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_num_valid_and_strided_hidden(backend):
    B, K, T, H = 2, 3, 5, 16
    hidden = torch.randn(K, B, T, H, device=DEVICE).transpose(0, 1)
    _, mask = hidden_and_masks(B, K, T, H, torch.full((B,), K))
    weight = torch.randn(H, device=DEVICE)
    loss, rewards = cai_kernels.reward_ranked_loss(hidden, mask, weight, backend=backend)
    ref_loss, ref_rewards = reference(hidden.double(), mask, weight.double())
    assert_close(loss, ref_loss, **FP32_TOL)
    assert_close(rewards, ref_rewards, **FP32_TOL)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")] + BACKENDS)
def test_valid_response_without_real_token_is_a_value_error(backend):
    num_valid = torch.tensor([3, 2], device=DEVICE)
    hidden, mask = hidden_and_masks(2, 3, 4, 8, num_valid)
    mask[1, 1] = 0
    with pytest.raises(ValueError, match=r"mask: every sequence needs at least one real token.*row 1, response 1"):
        cai_kernels.reward_ranked_loss(hidden, mask, torch.randn(8, device=DEVICE), num_valid=num_valid,
                                       backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    num_valid = torch.tensor([3, 2], device=DEVICE)
    hidden, mask = hidden_and_masks(2, 3, 3, 4, num_valid, torch.float64)
    weight = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: cai_kernels.reward_ranked_loss(h, mask, w, b, num_valid=num_valid, backend=backend),
        (hidden.requires_grad_(), weight, bias), fast_mode=backend == "triton")


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_num_valid_checked_before_masks(backend):
    hidden, mask = torch.randn(2, 3, 4, 8, device=DEVICE), torch.zeros(2, 3, 4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"num_valid must lie in \[0, 3\]"):
        cai_kernels.reward_ranked_loss(hidden, mask, torch.randn(8, device=DEVICE),
                                       num_valid=torch.tensor([0, 4], device=DEVICE), backend=backend)


def test_arguments():
    with pytest.raises(ValueError, match="hidden must have 4 dimensions"):
        cai_kernels.reward_ranked_loss(torch.randn(2, 4, 8, device=DEVICE), torch.ones(2, 4, dtype=torch.long),
                                       torch.randn(8))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3, 4\)"):
        cai_kernels.reward_ranked_loss(torch.randn(2, 3, 4, 8, device=DEVICE),
                                       torch.ones(2, 3, 5, dtype=torch.long, device=DEVICE), torch.randn(8, device=DEVICE))
