"""Bad input to the preference-model ops: a TypeError / ValueError naming the argument, never a crash or garbage."""

import math

import pytest
import torch

import cai_kernels
from tests._backends import compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = [pytest.param("reference", id="reference")] + compiled_backends("pairwise_loss", DEVICE)


def rewards(*shape):
    return torch.randn(shape, device=DEVICE)


# ------------------------------------------------------------------------------------------ pairwise_loss

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


# ----------------------------------------------------------------------------------- reward_pairwise_loss

def pm_inputs(B=2, T=4, H=8):
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    return dict(chosen_hidden=torch.randn(B, T, H, device=DEVICE), chosen_mask=mask,
                rejected_hidden=torch.randn(B, T, H, device=DEVICE), rejected_mask=mask.clone(),
                head_weight=torch.randn(H, device=DEVICE), head_bias=torch.zeros((), device=DEVICE))


@pytest.mark.parametrize("change,error,pattern", [
    (dict(chosen_hidden=torch.randn(2, 8)), ValueError, r"chosen_hidden must have 3 dimensions"),
    (dict(rejected_hidden=torch.randn(2, 4, 8, dtype=torch.float64)), TypeError,
     r"rejected_hidden must have the dtype of chosen_hidden"),
    (dict(rejected_hidden=torch.randn(3, 4, 8), rejected_mask=torch.ones(3, 4, dtype=torch.long)), ValueError,
     r"rejected_hidden must be \(B=2, T, H=8\)"),
    (dict(rejected_hidden=torch.randn(2, 4, 9)), ValueError, r"rejected_hidden must be \(B=2, T, H=8\)"),
    (dict(chosen_mask=torch.ones(2, 4)), TypeError, r"chosen_mask must be bool or an integer dtype"),
    (dict(rejected_mask=torch.ones(2, 5, dtype=torch.long)), ValueError,
     r"rejected_mask must have shape \(2, 4\) \(rejected_hidden.shape\[:-1\]\)"),
    (dict(chosen_mask=[[1, 1, 1, 1]] * 2), TypeError, r"chosen_mask must be a torch.Tensor"),
    (dict(head_weight=torch.randn(8, 1)), ValueError, r"head_weight must have shape \(8,\) or \(1, 8\)"),
    (dict(head_weight=torch.ones(8, dtype=torch.long)), TypeError, r"head_weight must have dtype"),
    (dict(head_bias=torch.zeros(2)), ValueError, r"head_bias must be a 0-d or 1-element tensor"),
    (dict(chosen_hidden=torch.randn(2, 0, 8), chosen_mask=torch.ones(2, 0, dtype=torch.long)), ValueError,
     r"chosen_hidden must have at least one position"),
    (dict(chosen_hidden=torch.randn(0, 4, 8), chosen_mask=torch.ones(0, 4, dtype=torch.long),
          rejected_hidden=torch.randn(0, 4, 8), rejected_mask=torch.ones(0, 4, dtype=torch.long)), ValueError,
     r"at least one pair"),
])
def test_reward_pairwise_loss_arguments(change, error, pattern):
    inputs = pm_inputs()
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=pattern):
        cai_kernels.reward_pairwise_loss(**inputs)


def test_reward_pairwise_loss_devices_and_labels():
    inputs = pm_inputs()
    with pytest.raises(ValueError, match="chosen_mask must be on the same device as chosen_hidden"):
        cai_kernels.reward_pairwise_loss(**{**inputs, "chosen_mask": inputs["chosen_mask"].to("meta")})
    with pytest.raises(ValueError, match="head_weight must be on the same device"):
        cai_kernels.reward_pairwise_loss(**{**inputs, "head_weight": inputs["head_weight"].to("meta")})
    with pytest.raises(ValueError, match=r"soft_labels must be broadcastable to the rewards' shape \(2,\)"):
        cai_kernels.reward_pairwise_loss(**inputs, soft_labels=torch.rand(3, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reward_pairwise_loss_label_values(backend):
    with pytest.raises(ValueError, match=r"soft_labels must lie in \[0, 1\]"):
        cai_kernels.reward_pairwise_loss(**pm_inputs(), soft_labels=torch.tensor([0.5, 1.5], device=DEVICE),
                                         backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_padding_row(backend):
    inputs = pm_inputs()
    inputs["rejected_mask"][0] = 0
    with pytest.raises(ValueError, match=r"rejected_mask: every sequence needs at least one real token .* "
                                         r"sequence 0 \(row 0\) has none"):
        cai_kernels.reward_pairwise_loss(**inputs, backend=backend)


def test_last_token_rewards_arguments():
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, H\) or \(B, K, T, H\)"):
        cai_kernels.last_token_rewards(torch.randn(4, 8, device=DEVICE), torch.ones(4, dtype=torch.long),
                                       torch.randn(8))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        cai_kernels.last_token_rewards(torch.randn(2, 4, 8, device=DEVICE),
                                       torch.ones(2, 5, dtype=torch.long, device=DEVICE), torch.randn(8, device=DEVICE))


# -------------------------------------------------------------------------------------------- ranked loss

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 5])
def test_num_valid_out_of_range(backend, bad):
    num_valid = torch.tensor([4, bad, 2], device=DEVICE)
    with pytest.raises(ValueError, match=rf"num_valid must lie in \[0, 4\] \(K = rewards.size\(1\)\); "
                                         rf"got num_valid\[1\] = {bad}"):
        cai_kernels.ranked_pairwise_loss(rewards(3, 4), num_valid=num_valid, backend=backend)


def test_ranked_arguments():
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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reward_ranked_num_valid_checked_before_masks(backend):
    hidden, mask = torch.randn(2, 3, 4, 8, device=DEVICE), torch.zeros(2, 3, 4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"num_valid must lie in \[0, 3\]"):
        cai_kernels.reward_ranked_loss(hidden, mask, torch.randn(8, device=DEVICE),
                                       num_valid=torch.tensor([0, 4], device=DEVICE), backend=backend)


def test_reward_ranked_arguments():
    with pytest.raises(ValueError, match="hidden must have 4 dimensions"):
        cai_kernels.reward_ranked_loss(torch.randn(2, 4, 8, device=DEVICE), torch.ones(2, 4, dtype=torch.long),
                                       torch.randn(8))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3, 4\)"):
        cai_kernels.reward_ranked_loss(torch.randn(2, 3, 4, 8, device=DEVICE),
                                       torch.ones(2, 3, 5, dtype=torch.long, device=DEVICE), torch.randn(8, device=DEVICE))
