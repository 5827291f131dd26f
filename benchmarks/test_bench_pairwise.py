"""Preference-model losses, forward + backward, against eager and compiled PyTorch on identical inputs."""

import pytest
import torch

import cai_kernels
from cai_kernels import reference


def hf_style_reward_loss(chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, weight, bias, soft_labels):
    """What HF sequence classifiers + TRL do: the head on every token, then the reward at the last real one
    (as an index: mask.size(1) - 1 - argmax of the flipped mask), then the loss."""
    def rewards(hidden, mask):
        last = mask.size(1) - 1 - mask.flip(-1).argmax(-1)
        return (hidden.float() @ weight + bias)[torch.arange(hidden.size(0)), last]
    return reference.pairwise_loss(rewards(chosen_hidden, chosen_mask), rewards(rejected_hidden, rejected_mask),
                                   soft_labels=soft_labels)


_compiled_pairwise = torch.compile(reference.pairwise_loss)
_compiled_reward = torch.compile(reference.reward_pairwise_loss)

PAIRWISE = {
    "cai_kernels": lambda c, r, p: cai_kernels.pairwise_loss(c, r, soft_labels=p),
    "reference": lambda c, r, p: reference.pairwise_loss(c, r, soft_labels=p),
    "compiled_reference": lambda c, r, p: _compiled_pairwise(c, r, soft_labels=p),
}

REWARD = {
    "cai_kernels": lambda *a: cai_kernels.reward_pairwise_loss(*a[:6], soft_labels=a[6])[0],
    "reference": lambda *a: reference.reward_pairwise_loss(*a[:6], soft_labels=a[6])[0],
    "compiled_reference": lambda *a: _compiled_reward(*a[:6], soft_labels=a[6])[0],
    "hf_style_head_on_all_tokens": hf_style_reward_loss,
}


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(PAIRWISE))
def test_pairwise_loss_fwd_bwd(benchmark, variant):
    batch = 65536
    benchmark.group = f"pairwise_loss fwd+bwd B={batch} fp32, soft labels, mean"
    chosen = torch.randn(batch, requires_grad=True)
    rejected = torch.randn(batch, requires_grad=True)
    labels = torch.rand(batch)
    fn = PAIRWISE[variant]

    def step():
        fn(chosen, rejected, labels).backward()

    step()  # warm-up (compiles)
    benchmark.pedantic(step, rounds=50, iterations=1)


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(REWARD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reward_pairwise_loss_fwd_bwd(benchmark, variant, dtype):
    batch, length, hidden_size = 64, 512, 576
    benchmark.group = f"reward_pairwise_loss fwd+bwd B={batch} T={length} H={hidden_size} {dtype}"
    chosen = torch.randn(batch, length, hidden_size).to(dtype).requires_grad_()
    rejected = torch.randn(batch, length, hidden_size).to(dtype).requires_grad_()
    lengths = torch.randint(1, length + 1, (batch,))
    positions = torch.arange(length)
    chosen_mask = (positions[None] < lengths[:, None]).long()                  # right padding
    rejected_mask = (positions[None] >= (length - lengths)[:, None]).long()    # left padding
    weight = (torch.randn(hidden_size) / hidden_size ** 0.5).requires_grad_()
    bias = torch.zeros((), requires_grad=True)
    args = (chosen, chosen_mask, rejected, rejected_mask, weight, bias, torch.rand(batch))
    fn = REWARD[variant]

    def step():
        fn(*args).backward()
        chosen.grad = rejected.grad = None

    step()
    benchmark.pedantic(step, rounds=10, iterations=1)
