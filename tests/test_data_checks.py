"""Checks that read tensor data: on the host for CPU tensors (ValueError), on the device for GPU tensors (NaN where
that row's result would be, nothing read out of bounds), on the host for GPU tensors too in ``cai_kernels.debug()``.

The GPU's policy is exercised here on CPU tensors through Triton's interpreter, with the host-side checks
switched off as on a GPU (``benchmarks.host_time.gpu_data_check_policy``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import cai_kernels as ck
from benchmarks.host_time import gpu_data_check_policy
from cai_kernels._validation import host_data_checks
from tests._backends import assert_close

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_policy_by_device_and_debug_switch():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert host_data_checks(torch.device("cpu")) and not host_data_checks(torch.device("meta"))
    assert not host_data_checks(cuda) and not ck.debug_enabled()
    with ck.debug():
        assert host_data_checks(cuda) and ck.debug_enabled()
        with ck.debug(False):
            assert not host_data_checks(cuda)
        assert host_data_checks(cuda)
    assert not host_data_checks(cuda)
    ck.debug()
    try:
        assert ck.debug_enabled()  # a plain call switches it on
    finally:
        ck.debug(False)


def test_env_var_turns_debug_on():
    code = "import cai_kernels as ck, torch; from cai_kernels._validation import host_data_checks as h; " \
           "print(ck.debug_enabled(), h(torch.device('cuda')))"
    for value, expected in (("1", "True True"), ("0", "False False")):
        env = {**os.environ, "CAI_KERNELS_DEBUG": value}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert run.stdout.strip() == expected, run.stderr[-2000:]


def test_out_of_range_targets_give_nan_on_the_device_path():
    logits = torch.randn(5, 7, device=DEVICE)
    targets = torch.tensor([0, 7, -3, 6, 2**40], device=DEVICE)
    good = torch.tensor([0, 0, 0, 6, 0], device=DEVICE)
    with gpu_data_check_policy():
        logp, entropy = ck.token_logprobs(logits, targets, return_entropy=True, backend="triton")
        ignored = ck.token_logprobs(logits, targets, ignore_index=-3, backend="triton")
        linear = ck.linear_token_logprobs(logits, torch.eye(7, device=DEVICE), targets, backend="triton")
    expected = ck.token_logprobs(logits, good, backend="triton")
    bad = torch.tensor([False, True, True, False, True])
    assert torch.isnan(logp[bad]).all() and torch.isnan(linear[bad]).all()
    assert_close(logp[~bad], expected[~bad])
    assert_close(linear[~bad], expected[~bad], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(entropy).all()  # the distribution is fine; only the target is not
    assert ignored[2] == 0 and torch.isnan(ignored[[1, 4]]).all()


def test_out_of_range_targets_raise_on_cpu_and_in_debug_mode():
    logits, targets = torch.randn(3, 7), torch.tensor([0, 7, 1])
    for backend in ("cpu", "triton", "reference"):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\)"):
            ck.token_logprobs(logits, targets, backend=backend)
    with gpu_data_check_policy():  # as on a GPU: the device path answers NaN...
        assert torch.isnan(ck.token_logprobs(logits, targets, backend="triton")[1])


@pytest.mark.parametrize("pieces", [2, 3])
def test_out_of_range_targets_give_nan_when_rows_are_split(monkeypatch, pieces):
    """The split path (several programs per row, then the merge kernel) checks the range as the unsplit one."""
    from cai_kernels.triton import token_logprobs as triton_kernels

    monkeypatch.setattr(triton_kernels, "FORCE_PIECES", pieces)
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", 16)
    logits = torch.randn(5, 101, device=DEVICE)
    targets = torch.tensor([0, 101, -3, 100, 2**40], device=DEVICE)
    good = torch.tensor([0, 0, 0, 100, 0], device=DEVICE)
    bad = torch.tensor([False, True, True, False, True])
    with gpu_data_check_policy():
        logp, entropy = ck.token_logprobs(logits, targets, return_entropy=True, backend="triton")
        ignored = ck.token_logprobs(logits, targets, ignore_index=-3, backend="triton")
    expected = ck.token_logprobs(logits, good, backend="reference")
    assert torch.isnan(logp[bad]).all() and torch.isfinite(entropy).all()
    assert_close(logp[~bad], expected[~bad], rtol=1e-5, atol=1e-5)
    assert ignored[2] == 0 and torch.isnan(ignored[[1, 4]]).all()


def test_out_of_range_targets_give_nan_on_the_tensor_core_lm_head():
    """bf16 hidden states take linear_head (tensor-core tiles, then the merge kernel that reads the target's row)."""
    hidden = torch.randn(5, 32, device=DEVICE).bfloat16()
    weight = torch.randn(48, 32, device=DEVICE).bfloat16()
    targets = torch.tensor([0, 48, -3, 47, 2**40], device=DEVICE)
    good = torch.tensor([0, 0, 0, 47, 0], device=DEVICE)
    bad = torch.tensor([False, True, True, False, True])
    with gpu_data_check_policy():
        logp = ck.linear_token_logprobs(hidden, weight, targets, backend="triton")
    expected = ck.linear_token_logprobs(hidden, weight, good, backend="reference")
    assert torch.isnan(logp[bad]).all()
    assert_close(logp[~bad].float(), expected[~bad].float(), rtol=2e-2, atol=2e-2)


def test_bad_soft_labels_give_nan_pairs_on_the_device_path():
    chosen, rejected = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    labels = torch.tensor([0.5, 1.5, -0.1, 1.0], device=DEVICE)
    with gpu_data_check_policy():
        per_pair = ck.pairwise_loss(chosen, rejected, soft_labels=labels, reduction="none", backend="triton")
        mean = ck.pairwise_loss(chosen, rejected, soft_labels=labels, backend="triton")
    assert torch.isnan(per_pair[1:3]).all() and torch.isfinite(per_pair[[0, 3]]).all() and torch.isnan(mean)
    with pytest.raises(ValueError, match="soft_labels must lie in"):
        ck.pairwise_loss(chosen.cpu(), rejected.cpu(), soft_labels=labels.cpu(), backend="triton")


def test_sequences_without_a_real_token_give_nan_rewards_on_the_device_path():
    hidden, weight = torch.randn(3, 4, 5, device=DEVICE), torch.randn(5, device=DEVICE)
    mask = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with gpu_data_check_policy():
        rewards = ck.last_token_rewards(hidden, mask, weight, backend="triton")
    assert torch.isnan(rewards[1]) and torch.isfinite(rewards[[0, 2]]).all()
    with pytest.raises(ValueError, match="every sequence needs at least one real token"):
        ck.last_token_rewards(hidden.cpu(), mask.cpu(), weight.cpu(), backend="triton")


def test_bad_counts_give_nan_rows_on_the_device_path():
    rewards = torch.randn(3, 4, device=DEVICE)
    num_valid = torch.tensor([2, 9, -1], device=DEVICE)
    with gpu_data_check_policy():
        rows = ck.ranked_pairwise_loss(rewards, num_valid=num_valid, reduction="none", backend="triton")
        mean = ck.ranked_pairwise_loss(rewards, num_valid=num_valid, backend="triton")
    assert math.isfinite(rows[0]) and torch.isnan(rows[1:]).all() and torch.isnan(mean)
    with pytest.raises(ValueError, match="num_valid must lie in"):
        ck.ranked_pairwise_loss(rewards.cpu(), num_valid=num_valid.cpu(), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_debug_mode_raises_on_the_gpu():
    logits, targets = torch.randn(3, 7, device="cuda"), torch.tensor([0, 7, 1], device="cuda")
    assert torch.isnan(ck.token_logprobs(logits, targets)[1])
    with ck.debug(), pytest.raises(ValueError, match=r"targets must lie in \[0, 7\)"):
        ck.token_logprobs(logits, targets)
