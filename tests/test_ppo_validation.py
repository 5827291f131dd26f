"""Bad input to the PPO ops: a TypeError / ValueError naming the argument, never a crash or garbage."""

import math

import pytest
import torch

import cai_kernels
from tests._ppo_inputs import DEVICE, logprobs, normal, response_mask

B, T = 3, 5


@pytest.fixture
def x():
    return logprobs(B, T)


@pytest.fixture
def mask():
    return response_mask(B, T)


# ---- kl_penalty --------------------------------------------------------------------------------

def test_kl_types(x):
    with pytest.raises(TypeError, match="logprobs must be a torch.Tensor"):
        cai_kernels.kl_penalty([[0.0]], x)
    with pytest.raises(TypeError, match="ref_logprobs must have dtype"):
        cai_kernels.kl_penalty(x, torch.zeros(B, T, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="logprobs must have at least 1 dimension"):
        cai_kernels.kl_penalty(torch.tensor(0.0), torch.tensor(0.0))


def test_kl_shapes_and_devices(x):
    with pytest.raises(ValueError, match=r"ref_logprobs must have the shape of logprobs \(3, 5\); got \(3, 4\)"):
        cai_kernels.kl_penalty(x, logprobs(B, 4))
    with pytest.raises(ValueError, match="ref_logprobs must be on the same device as logprobs"):
        cai_kernels.kl_penalty(x, x.to("meta"))


@pytest.mark.parametrize("estimator, error", [("k4", ValueError), ("kl", ValueError), (3, TypeError)])
def test_kl_estimator(x, estimator, error):
    with pytest.raises(error, match="estimator must be"):
        cai_kernels.kl_penalty(x, x, estimator)


@pytest.mark.parametrize("name", ["clamp", "output_clamp"])
@pytest.mark.parametrize("bad, error, message", [
    ((1.0,), TypeError, "pair"), (5.0, TypeError, "pair"), ((2.0, 1.0), ValueError, "lo <= hi"),
    ((math.nan, 1.0), ValueError, "NaN"), (("a", 1.0), TypeError, "lo must be a number"),
])
def test_kl_clamps(x, name, bad, error, message):
    with pytest.raises(error, match=f"{name}.*{message}"):
        cai_kernels.kl_penalty(x, x, "k3", **{name: bad})


# ---- gae ---------------------------------------------------------------------------------------

def test_gae_shapes(x, mask):
    with pytest.raises(ValueError, match="rewards must have 2 dimensions"):
        cai_kernels.gae(x[0], x[0], mask[0])
    with pytest.raises(ValueError, match=r"values must have shape \(3, 5\) \(like rewards\)"):
        cai_kernels.gae(x, logprobs(B, 4), mask)
    with pytest.raises(ValueError, match=r"response_mask must have shape \(3, 5\)"):
        cai_kernels.gae(x, x, mask[:, :4])


def test_gae_types(x, mask):
    with pytest.raises(TypeError, match="rewards must have dtype"):
        cai_kernels.gae(x.long(), x, mask)
    with pytest.raises(TypeError, match="response_mask must be bool, integer or floating"):
        cai_kernels.gae(x, x, mask.to(torch.complex64))
    with pytest.raises(TypeError, match="response_mask must be a torch.Tensor"):
        cai_kernels.gae(x, x, [[1] * T] * B)


@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_gae_discount_range(x, mask, name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number in \[0.0, 1.0\]"):
        cai_kernels.gae(x, x, mask, **{name: bad})


def test_gae_discount_type(x, mask):
    with pytest.raises(TypeError, match="gamma must be a number"):
        cai_kernels.gae(x, x, mask, gamma="0.9")
    with pytest.raises(TypeError, match="lam must be a number"):
        cai_kernels.gae(x, x, mask, lam=True)


def test_gae_devices(x, mask):
    with pytest.raises(ValueError, match="response_mask must be on the same device as rewards"):
        cai_kernels.gae(x, x, mask.to("meta"))


# ---- masked_whiten -----------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, -1e-8, math.inf])
def test_whiten_eps(x, mask, eps):
    with pytest.raises(ValueError, match="eps must be a finite number in"):
        cai_kernels.masked_whiten(x, mask, eps=eps)


def test_whiten_flags_and_shapes(x, mask):
    with pytest.raises(TypeError, match="shift_mean must be a bool"):
        cai_kernels.masked_whiten(x, mask, shift_mean=1)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        cai_kernels.masked_whiten(x, mask, unbiased="yes")
    with pytest.raises(ValueError, match=r"response_mask must have shape \(3, 5\)"):
        cai_kernels.masked_whiten(x, mask.t())
    with pytest.raises(TypeError, match="eps must be a number"):
        cai_kernels.masked_whiten(x, mask, eps=None)


# ---- ppo_advantages ----------------------------------------------------------------------------

def test_advantages_arguments(x, mask):
    scores = normal(1, B)[0]
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\) \(one score per row of logprobs\)"):
        cai_kernels.ppo_advantages(scores[:2], x, x, x, mask, kl_coef=0.1)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        cai_kernels.ppo_advantages([1.0, 2.0, 3.0], x, x, x, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"values must have shape \(3, 5\) \(like logprobs\)"):
        cai_kernels.ppo_advantages(scores, x, x, x[:, 1:], mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a finite number in"):
        cai_kernels.ppo_advantages(scores, x, x, x, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="estimator must be one of"):
        cai_kernels.ppo_advantages(scores, x, x, x, mask, kl_coef=0.1, estimator="k5")
    with pytest.raises(TypeError, match="whiten must be a bool"):
        cai_kernels.ppo_advantages(scores, x, x, x, mask, kl_coef=0.1, whiten=None)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        cai_kernels.ppo_advantages(scores, x, x, x, mask, kl_coef=0.1, gamma=2.0)
    with pytest.raises(TypeError, match="kl_coef"):
        cai_kernels.ppo_advantages(scores, x, x, x, mask)


# ---- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(clip_low=1.0), ValueError, r"clip_low must be a finite number in \[0, 1\)"),
    (dict(clip_low=-0.1), ValueError, "clip_low must be a finite number"),
    (dict(clip_low=math.nan), ValueError, "clip_low must be a finite number"),
    (dict(clip_high=-0.2), ValueError, "clip_high must be a finite number"),
    (dict(clip_high="0.2"), TypeError, "clip_high must be a number"),
    (dict(dual_clip=1.0), ValueError, r"dual_clip must be a finite number in \(1.0, inf\]"),
    (dict(dual_clip=0.5), ValueError, "dual_clip"),
    (dict(agg="mean"), ValueError, "agg must be one of"),
    (dict(agg=None), TypeError, "agg must be a str"),
])
def test_policy_loss_arguments(x, mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        cai_kernels.ppo_policy_loss(x, x, x, mask, **kwargs)


def test_policy_loss_shapes(x, mask):
    with pytest.raises(ValueError, match=r"advantages must have shape \(3, 5\) \(like logprobs\)"):
        cai_kernels.ppo_policy_loss(x, x, x[:2], mask)
    with pytest.raises(ValueError, match="old_logprobs must be on the same device as logprobs"):
        cai_kernels.ppo_policy_loss(x, x.to("meta"), x, mask)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(clip=-0.2), ValueError, "clip must be a finite number"),
    (dict(clip=math.inf), ValueError, "clip must be a finite number"),
    (dict(clip="x"), TypeError, "clip must be a number"),
    (dict(agg="sum"), ValueError, "agg must be one of"),
])
def test_value_loss_arguments(x, mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        cai_kernels.ppo_value_loss(x, x, x, mask, **kwargs)


def test_value_loss_shapes(x, mask):
    with pytest.raises(ValueError, match=r"returns must have shape \(3, 5\) \(like values\)"):
        cai_kernels.ppo_value_loss(x, x, x[:, :2], mask)
    with pytest.raises(TypeError, match="values must have dtype"):
        cai_kernels.ppo_value_loss(x.int(), x, x, mask)


@pytest.mark.parametrize("op", ["kl_penalty", "gae", "masked_whiten", "ppo_advantages", "ppo_policy_loss",
                                "ppo_value_loss"])
def test_unknown_backend(x, mask, op):
    args = {"kl_penalty": (x, x), "gae": (x, x, mask), "masked_whiten": (x, mask),
            "ppo_advantages": (normal(1, B)[0], x, x, x, mask), "ppo_policy_loss": (x, x, x, mask),
            "ppo_value_loss": (x, x, x, mask)}[op]
    kwargs = {"kl_coef": 0.1} if op == "ppo_advantages" else {}
    with pytest.raises(ValueError, match="backend must be one of"):
        getattr(cai_kernels, op)(*args, backend="fortran", **kwargs)
