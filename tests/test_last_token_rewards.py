"""last_token_rewards: the reward head at each sequence's last real token, against the float64
reference (its gradients are tested through reward_pairwise_loss and reward_ranked_loss); bad input."""

import pytest
import torch

import cai_kernels
from cai_kernels.reference import last_token_rewards as reference
from tests._backends import assert_close, compiled_backends
from tests._preference import DEVICE, FP32_TOL, padded_mask, random_head, random_hidden

BACKENDS = compiled_backends("last_token_rewards", DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_real_token_is_the_highest_nonzero_position(backend):
    # hand-made masks: holes, a single token, padding on both sides
    mask = torch.tensor([[1, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 1],
                         [1, 0, 0, 0, 0, 0],
                         [0, 1, 1, 0, 1, 0]], device=DEVICE)
    hidden = torch.zeros(4, 6, 3, device=DEVICE)
    hidden[:, :, 0] = torch.arange(6, dtype=torch.float32, device=DEVICE)  # reward = position of the token read
    rewards = cai_kernels.last_token_rewards(hidden, mask, torch.tensor([1.0, 0.0, 0.0], device=DEVICE),
                                             backend=backend)
    assert rewards.tolist() == [3.0, 5.0, 0.0, 4.0]


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")] + BACKENDS)
def test_three_and_four_dims(backend):
    hidden, mask = random_hidden(2, 3, 7, 12), padded_mask(6, 7, "holes").reshape(2, 3, 7)
    weight, bias = random_head(12)
    assert_close(cai_kernels.last_token_rewards(hidden, mask, weight, bias, backend=backend),
                 reference(hidden.double(), mask, weight.double(), bias.double()), **FP32_TOL)
    assert_close(cai_kernels.last_token_rewards(hidden[0], mask[0], weight, backend=backend),
                 reference(hidden[0].double(), mask[0], weight.double()), **FP32_TOL)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

def test_arguments():
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, H\) or \(B, K, T, H\)"):
        cai_kernels.last_token_rewards(torch.randn(4, 8, device=DEVICE), torch.ones(4, dtype=torch.long),
                                       torch.randn(8))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        cai_kernels.last_token_rewards(torch.randn(2, 4, 8, device=DEVICE),
                                       torch.ones(2, 5, dtype=torch.long, device=DEVICE), torch.randn(8, device=DEVICE))
