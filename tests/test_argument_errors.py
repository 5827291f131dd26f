"""The unclear errors of issue 13, each a clear error (or a working call) now: values the custom-op schemas cannot
hold, torch.compile(dynamic=True) of the argument checks, torch.func on the compiled backends, meta tensors."""

from __future__ import annotations

import warnings

import pytest
import torch

import cai_kernels as ck
from tests._backends import assert_close, compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends("token_logprobs", DEVICE))
def test_ignore_index_beyond_int64_is_a_value_error(backend):
    logits, targets = torch.randn(3, 7, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE)
    for op in (lambda **kw: ck.token_logprobs(logits, targets, **kw),
               lambda **kw: ck.linear_token_logprobs(logits, torch.randn(7, 7, device=DEVICE), targets, **kw)):
        with pytest.raises(ValueError, match=r"ignore_index must fit in int64.*got 1180591620717411303424"):
            op(ignore_index=2**70, backend=backend)
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            op(ignore_index=-2**63 - 1, backend=backend)
        op(ignore_index=2**63 - 1, backend=backend)  # the largest int64 is fine


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends("token_logprobs", DEVICE))
def test_return_entropy_must_be_a_bool(backend):
    logits, targets = torch.randn(3, 7, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(TypeError, match="return_entropy must be a bool; got str"):
        ck.token_logprobs(logits, targets, return_entropy="yes", backend=backend)
    with pytest.raises(TypeError, match="return_entropy must be a bool; got int"):
        ck.linear_token_logprobs(logits, torch.randn(7, 7, device=DEVICE), targets, return_entropy=1,
                                 backend=backend)


@pytest.mark.parametrize("backend", compiled_backends("ppo_policy_loss", DEVICE))
def test_compile_with_dynamic_shapes_and_float_arguments(backend):
    torch._dynamo.reset()
    mask = torch.rand(4, 9, device=DEVICE) < 0.7

    def step(logprobs, old, advantages, clip, coef):
        loss, _ = ck.ppo_policy_loss(logprobs, old, advantages, mask[: logprobs.size(0)], clip_low=clip,
                                     clip_high=clip, backend=backend)
        kl = ck.kl_penalty(logprobs, old, "k3", clamp=(-coef, coef), backend=backend)
        return loss + kl.mean()

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    for rows, clip, coef in ((4, 0.2, 5.0), (3, 0.3, 7.5)):
        args = [torch.randn(rows, 9, device=DEVICE) for _ in range(3)]
        assert_close(compiled(*args, clip, coef), step(*args, clip, coef), rtol=1e-5, atol=1e-6)


def test_compile_with_dynamic_shapes_still_checks_numbers():
    torch._dynamo.reset()
    x = torch.randn(2, 5, device=DEVICE)
    compiled = torch.compile(lambda a, c: ck.kl_penalty(a, a, "k1", clamp=(-c, c)), dynamic=True)
    with pytest.raises(Exception, match="clamp"):
        compiled(x, float("nan"))


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs", "pairwise_loss", "last_token_rewards",
                                "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss", "kl_penalty",
                                "gae", "masked_whiten", "ppo_advantages", "ppo_policy_loss", "ppo_value_loss"])
def test_meta_tensors_give_shapes_without_reading_data(op):
    def m(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    mask, long = m(2, 4, dtype=torch.bool), torch.int64
    calls = {
        "token_logprobs": lambda: ck.token_logprobs(m(2, 4, 8), m(2, 4, dtype=long), return_entropy=True),
        "linear_token_logprobs": lambda: ck.linear_token_logprobs(m(4, 8), m(16, 8), m(4, dtype=long)),
        "pairwise_loss": lambda: ck.pairwise_loss(m(4), m(4), soft_labels=m(4)),
        "last_token_rewards": lambda: ck.last_token_rewards(m(2, 4, 8), mask, m(8)),
        "reward_pairwise_loss": lambda: ck.reward_pairwise_loss(m(2, 4, 8), mask, m(2, 4, 8), mask, m(8),
                                                                soft_labels=m(2)),
        "ranked_pairwise_loss": lambda: ck.ranked_pairwise_loss(m(2, 3), num_valid=m(2, dtype=long)),
        "reward_ranked_loss": lambda: ck.reward_ranked_loss(m(2, 3, 4, 8), m(2, 3, 4, dtype=torch.bool), m(8),
                                                            num_valid=m(2, dtype=long)),
        "kl_penalty": lambda: ck.kl_penalty(m(2, 4), m(2, 4), "k3"),
        "gae": lambda: ck.gae(m(2, 4), m(2, 4), mask),
        "masked_whiten": lambda: ck.masked_whiten(m(2, 4), mask),
        "ppo_advantages": lambda: ck.ppo_advantages(m(2), m(2, 4), m(2, 4), m(2, 4), mask, kl_coef=0.1),
        "ppo_policy_loss": lambda: ck.ppo_policy_loss(m(2, 4), m(2, 4), m(2, 4), mask),
        "ppo_value_loss": lambda: ck.ppo_value_loss(m(2, 4), m(2, 4), m(2, 4), mask),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # meta tensors run on the reference: said once
        out = calls[op]()
    first = out[0] if isinstance(out, tuple) else out
    assert first.device.type == "meta"


def test_choice_logprobs_on_meta_tensors_says_why_not():
    long = torch.int64
    with pytest.raises(ValueError, match="cannot run on meta tensors: the width K = max\\(num_options\\)"):
        ck.choice_logprobs(torch.empty(6, device="meta", dtype=long), torch.empty(6, device="meta", dtype=long),
                           torch.empty(2, device="meta", dtype=long), logits=torch.empty(6, 9, device="meta"))
