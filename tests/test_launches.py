"""Device launches and host synchronizations per op call on the GPU path (Triton), without a GPU.

Each op on tiny inputs (``benchmarks/host_time.py``'s cases) runs its Triton path on CPU tensors with the GPU's
data-check policy (no host-side data checks: on a GPU they run on the device) and with the Triton launches
recorded and skipped; the PyTorch ops that would launch a CUDA kernel are counted from the profiler
(``benchmarks/_launches.py``). One launch per op where the math allows, two where a global reduction needs
them (the reduction's partial sums, then one program that adds them in order); the composite ops run their
parts' kernels. With a GPU the same counts come from the CUDA profiler, and no call may synchronize
(``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import host_time
from benchmarks._launches import LaunchCounter, torch_launches, triton_launches

pytest.importorskip("triton")

# (no-grad forward, forward + backward) launches per call; None: not differentiable.
EXPECTED = {
    "token_logprobs": (1, 2),
    "pairwise_loss": (1, 2),                 # <= 1024 pairs; more: 2 forward (the partial sums, then their sum)
    "last_token_rewards": (1, 3),            # backward: the hidden states' gradient, the head's (+ bias)
    "reward_pairwise_loss": (3, 9),          # 2 x last_token_rewards + pairwise_loss; + the head's 2 grads added
    "ranked_pairwise_loss": (2, 3),          # rows, then their mean
    "reward_ranked_loss": (3, 6),
    "kl_penalty": (1, 2),
    "gae": (1, None),
    "masked_whiten": (2, None),              # moments per row, then merge + whiten
    "ppo_advantages": (2, None),             # KL + shaping + GAE + moments, then merge + whiten
    "ppo_policy_loss": (2, 3),               # rows, then the reduction over rows; backward one
    "ppo_value_loss": (2, 3),
}
# linear_token_logprobs' Triton path is being replaced by the tensor-core LM head (triton/linear_head.py);
# choice_logprobs reads K = max(num_options) on the host by design: both are checked for synchronizations only.
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "tolist"}


def _case(op: str, device="cpu") -> host_time.Case:
    return next(c for c in host_time.cases(device) if c.op == op)


def _modes(op: str):
    forward, backward = EXPECTED[op]
    return [("fwd", forward)] + ([("fwd+bwd", backward)] if backward is not None else [])


@pytest.mark.parametrize("op,mode,expected", [(op, mode, n) for op in EXPECTED for mode, n in _modes(op)])
def test_launches_per_call(op, mode, expected):
    counter = host_time.launches_per_call(_case(op), mode)
    assert counter.total == expected, (counter.triton, counter.torch)


def test_a_global_reduction_takes_two_launches():
    import cai_kernels as ck

    chosen, rejected = torch.randn(5000), torch.randn(5000)  # 5 programs of 1024 pairs
    counter = LaunchCounter(run=False)
    with triton_launches(counter=counter), host_time.gpu_data_check_policy():
        ck.pairwise_loss(chosen, rejected, backend="triton")
        counter.reset()
        with torch_launches(counter):
            ck.pairwise_loss(chosen, rejected, backend="triton")
    assert counter.triton == ["pairwise_loss_fwd_kernel", "sum_partials_kernel"] and not counter.torch


@pytest.mark.parametrize("op", [c.op for c in host_time.cases()])
def test_no_host_synchronization(op):
    """No op reads device data on the host (choice_logprobs: once, K = max(num_options), by design)."""
    case = _case(op)
    for mode in ("fwd", "fwd+bwd") if case.differentiable else ("fwd",):
        counter = LaunchCounter(run=True)
        with triton_launches(counter=counter), host_time.gpu_data_check_policy():
            step = host_time.timed_step(case, "triton", mode)
            step()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                step()
        reads = [e.name for e in profile.events() if e.name.removeprefix("aten::") in SYNC_OPS]
        assert not reads, (op, mode, reads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: counts CUDA kernels, catches synchronizations")
@pytest.mark.parametrize("op,mode,expected", [(op, mode, n) for op in EXPECTED for mode, n in _modes(op)])
def test_cuda_launches_and_no_synchronization(op, mode, expected):
    step = host_time.timed_step(_case(op, "cuda"), None, mode)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        torch.cuda.set_sync_debug_mode("error")  # a synchronization in the call raises
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == expected, kernels
