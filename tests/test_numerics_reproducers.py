"""The silent wrong numbers of issue 13, one reproducer each: NaN and inf propagate as the float64 reference
says on every backend, and extreme-but-finite inputs give the reference's (finite) answer.

Each test failed before its fix (the backend and the wrong value it gave are in its docstring).
The broad version of these checks is the fuzz test, ``tests/test_fuzz_backends.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import cai_kernels as ck
from cai_kernels import reference
from tests._backends import assert_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the interpreter runs Triton here")
BACKENDS = ("reference", "cpu", "triton")
MASKS = (torch.bool, torch.int64, torch.float32)


def _ppo_batch(B: int = 2, T: int = 6):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    return lp, old, adv, mask


# ---- NaN in a read input: NaN out (Triton's minimum / maximum dropped it) ---------------------------------

@pytest.mark.parametrize("dual_clip", (None, 3.0))
@pytest.mark.parametrize("which", ("lp", "old", "adv"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_policy_loss_is_nan_when_a_response_token_is_nan(backend, which, dual_clip):
    """Triton returned a finite loss (the clamp of a NaN log-ratio gave +-20)."""
    lp, old, adv, mask = _ppo_batch()
    tensors = {"lp": lp, "old": old, "adv": adv}
    tensors[which] = tensors[which].clone()
    tensors[which][0, 2] = math.nan
    loss, _ = ck.ppo_policy_loss(tensors["lp"], tensors["old"], tensors["adv"], mask, dual_clip=dual_clip,
                                 backend=backend)
    assert loss.isnan(), loss


@pytest.mark.parametrize("which", ("values", "old", "returns"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_value_loss_is_nan_when_a_response_token_is_nan(backend, which):
    """Triton returned a finite loss (the clamp of a NaN value to old +- clip gave a bound)."""
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(2, 5, generator=g) for k in ("values", "old", "returns")}
    tensors[which][1, 1] = math.nan
    mask = torch.ones(2, 5)
    loss, _ = ck.ppo_value_loss(tensors["values"], tensors["old"], tensors["returns"], mask, clip=0.2,
                                backend=backend)
    assert loss.isnan(), loss


@pytest.mark.parametrize("estimator", ("k3", "low_var_kl"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_k3_follows_the_reference_at_nan_and_minus_inf(backend, estimator):
    """Triton's k3 was -inf (a negative KL) for NaN and for r = -inf, where k3 is NaN and +inf."""
    lp = torch.tensor([[math.nan, -math.inf, -1.0, 0.0, -2.0]])
    ref = torch.tensor([[-1.0, -0.5, math.nan, -math.inf, -1.5]])
    out = ck.kl_penalty(lp, ref, estimator, backend=backend)
    expected = reference.kl_penalty(lp.double(), ref.double(), estimator)
    assert expected[0, [0, 2]].isnan().all()
    # r = -inf and r = +inf: k3 is +inf (low_var_kl clamps r to +-20, then the estimate to 10)
    assert (expected[0, [1, 3]] == (math.inf if estimator == "k3" else 10.0)).all()
    assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---- extreme finite inputs: the reference's answer -----------------------------------------------------

@pytest.mark.parametrize("scale,temperature", ((3.0, 1e-10), (1e10, 0.7), (1e30, 1.0)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_finite_at_huge_logits_over_temperature(backend, scale, temperature):
    """cpu gave +inf / NaN log-probs once |logits / T| passed ~1e9 (log2 e folded into the fma's operands)."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 50, generator=g) * scale).requires_grad_()
    targets = torch.tensor([0, 7, int(logits[2].argmax())])
    logp, entropy = ck.token_logprobs(logits, targets, temperature=temperature, return_entropy=True, backend=backend)
    leaf = logits.detach().double().requires_grad_()
    ref_logp, ref_entropy = reference.token_logprobs(leaf, targets, temperature=temperature, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all(), (logp, entropy)
    assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5, msg="logprobs")
    assert_close(entropy, ref_entropy, rtol=1e-4, atol=1e-4, msg="entropy")
    upstream = torch.randn(3, generator=g, dtype=torch.float64)
    (logp * upstream.float()).sum().backward()
    (ref_logp * upstream).sum().backward()
    assert_close(logits.grad, leaf.grad, rtol=1e-4, atol=1e-6 * leaf.grad.abs().max().item(), msg="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_finite_at_temperature_1e_minus_10(backend):
    """cpu gave +inf / NaN with temperature 1e-10 (same cause as token_logprobs)."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(4, 8, generator=g), torch.randn(40, 8, generator=g)
    targets = torch.tensor([1, 5, 9, 39])
    logp = ck.linear_token_logprobs(hidden, weight, targets, temperature=1e-10, backend=backend)
    expected = reference.linear_token_logprobs(hidden.double(), weight.double(), targets, temperature=1e-10)
    assert torch.isfinite(logp).all(), logp
    assert_close(logp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", (1e20, 1e30))
@pytest.mark.parametrize("mask_dtype", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_of_inputs_near_1e20(backend, mask_dtype, scale):
    """cpu returned all zeros for fp32 inputs near 1e20 (their squares overflow fp32)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 17, generator=g) * scale
    mask = (torch.rand(3, 17, generator=g) < 0.8).to(mask_dtype)
    out = ck.masked_whiten(x, mask, backend=backend)
    expected = reference.masked_whiten(x.double(), mask)
    assert out[mask != 0].abs().max() > 0.5
    assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_advantages_whitened_at_1e30(backend):
    """cpu returned zero advantages for values and scores near 1e30 (the whitening step's squares)."""
    g = torch.Generator().manual_seed(5)
    B, T = 3, 12
    lp = -torch.rand(B, T, generator=g)
    values, scores = torch.randn(B, T, generator=g) * 1e30, torch.randn(B, generator=g) * 1e30
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 9:] = False
    adv, *_ = ck.ppo_advantages(scores, lp, lp, values, mask, kl_coef=0.0, backend=backend)
    expected, *_ = reference.ppo_advantages(scores.double(), lp.double(), lp.double(), values.double(), mask,
                                            kl_coef=0.0)
    assert adv[mask].abs().max() > 0.5
    assert_close(adv, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mean", (1e6, 3e7, 1e8))
def test_reference_masked_whiten_keeps_its_digits_at_large_means(mean):
    """The fp32 reference was off by up to 0.18 (the mean rounded to fp32, then every value shifted by it)."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 64, generator=g, dtype=torch.float64) * 4 + mean).float()
    mask = torch.rand(4, 64, generator=g) < 0.9
    out = reference.masked_whiten(x, mask)
    assert out.dtype == torch.float32
    assert_close(out, reference.masked_whiten(x.double(), mask), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_loss_of_rewards_at_the_edge_of_fp32(backend):
    """pairwise_loss(3e38, -3e38) was inf (chosen - rejected overflows fp32) though the loss is finite."""
    chosen = torch.tensor([3e38, -3e38, 3.4e38, 1.0], requires_grad=True)
    rejected = torch.tensor([-3e38, 3e38, -3.4e38, 2.0], requires_grad=True)
    for reduction in ("none", "mean", "sum"):
        loss = ck.pairwise_loss(chosen, rejected, reduction=reduction, backend=backend)
        expected = reference.pairwise_loss(chosen.detach().double(), rejected.detach().double(), reduction=reduction)
        # rounded once to fp32: the loss of row 1 (6e38) is inf, their mean (1.5e38) is not
        assert_close(loss, expected.float(), rtol=1e-5, atol=1e-5, msg=reduction)
    loss = ck.pairwise_loss(chosen[:1], rejected[:1], backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# ---- NaN in padding never reaches a gradient on valid entries (reference backward) -----------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ranked_pairwise_loss_gradient_ignores_nan_padding(backend):
    """The reference's gradient was NaN on valid rewards when padding (k >= num_valid) held NaN."""
    rewards = torch.tensor([[1.0, 0.5, math.nan, math.inf], [2.0, -1.0, 0.0, 3.0]], requires_grad=True)
    num_valid = torch.tensor([2, 4])
    loss = ck.ranked_pairwise_loss(rewards, num_valid=num_valid, backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(rewards.grad).all(), rewards.grad
    assert (rewards.grad[0, 2:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_ranked_loss_gradient_ignores_nan_padding(backend):
    """The reference's head gradient was NaN when a padding response (k >= num_valid) held NaN."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 3, 4, 5, generator=g)
    hidden[0, 2] = math.nan
    hidden.requires_grad_()
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    weight = torch.randn(5, generator=g).requires_grad_()
    loss, _ = ck.reward_ranked_loss(hidden, mask, weight, num_valid=torch.tensor([2]), backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(weight.grad).all(), weight.grad
    assert torch.isfinite(hidden.grad[0, :2]).all() and (hidden.grad[0, 2] == 0).all()


@pytest.mark.parametrize("clip", (None, 0.2))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_value_loss_gradient_ignores_nan_padding(backend, clip):
    """The reference's gradient was NaN on response tokens when masked positions held NaN / inf."""
    g = torch.Generator().manual_seed(8)
    values, old, returns = (torch.randn(2, 6, generator=g) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    values[:, 4:], old[:, 5], returns[:, 4] = math.nan, math.inf, -math.inf
    values.requires_grad_()
    loss, _ = ck.ppo_value_loss(values, old, returns, mask, clip=clip, agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(values.grad).all() and (values.grad[:, 4:] == 0).all(), values.grad
