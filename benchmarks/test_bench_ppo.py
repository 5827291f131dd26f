"""The PPO ops against the reference loop and against the unfused composition, on identical inputs.

`python benchmarks/ppo_timing.py` prints the same comparisons as one table (and can time
torch.compile of the reference loop, which takes long to compile).
"""

import pytest
import torch

import cai_kernels
from cai_kernels import reference
from ppo_timing import SHAPE, PPOBatch, fused_ppo_advantages, unfused_ppo_advantages

BATCH = PPOBatch.random(*SHAPE)

GAE_VARIANTS = {
    "cai_kernels": lambda b: cai_kernels.gae(b.rewards, b.values, b.response_mask),
    "reference_loop": lambda b: reference.gae(b.rewards, b.values, b.response_mask),
}

ADVANTAGE_VARIANTS = {
    "fused": fused_ppo_advantages,
    "composed_from_our_ops": unfused_ppo_advantages,
}


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(GAE_VARIANTS))
def test_gae(benchmark, variant):
    benchmark.group = f"gae {SHAPE[0]}x{SHAPE[1]} fp32"
    fn = GAE_VARIANTS[variant]
    fn(BATCH)
    rounds = 5 if variant == "reference_loop" else 200
    benchmark.pedantic(fn, args=(BATCH,), rounds=rounds, iterations=1)


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(ADVANTAGE_VARIANTS))
def test_ppo_advantages(benchmark, variant):
    benchmark.group = f"ppo_advantages {SHAPE[0]}x{SHAPE[1]} fp32"
    fn = ADVANTAGE_VARIANTS[variant]
    fn(BATCH)
    benchmark.pedantic(fn, args=(BATCH,), rounds=100, iterations=1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_forward_backward(benchmark, agg):
    benchmark.group = f"ppo_policy_loss fwd+bwd {SHAPE[0]}x{SHAPE[1]} fp32"
    logprobs = BATCH.logprobs.clone().requires_grad_()

    def step():
        loss, _ = cai_kernels.ppo_policy_loss(logprobs, BATCH.ref_logprobs, BATCH.rewards, BATCH.response_mask,
                                              dual_clip=3.0, agg=agg)
        loss.backward()

    step()
    benchmark.pedantic(step, rounds=50, iterations=1)


def test_policy_loss_reference_forward_backward(benchmark):
    benchmark.group = f"ppo_policy_loss fwd+bwd {SHAPE[0]}x{SHAPE[1]} fp32"
    logprobs = BATCH.logprobs.clone().requires_grad_()

    def step():
        loss, _ = reference.ppo_policy_loss(logprobs, BATCH.ref_logprobs, BATCH.rewards, BATCH.response_mask,
                                            dual_clip=3.0)
        loss.backward()

    step()
    benchmark.pedantic(step, rounds=50, iterations=1)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty(benchmark, estimator):
    benchmark.group = f"kl_penalty {SHAPE[0]}x{SHAPE[1]} fp32"
    fn = lambda: cai_kernels.kl_penalty(BATCH.logprobs, BATCH.ref_logprobs, estimator)  # noqa: E731
    fn()
    benchmark.pedantic(fn, rounds=100, iterations=1)
