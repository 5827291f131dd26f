"""cai_kernels.integrations.verl against veRL's own code (0.9.1 from PyPI, installed --no-deps).

veRL's functions are compared on response tokens; off the mask our ops return 0 where veRL keeps
whitened / carried values that no consumer of its reads (see the adapter's module doc).
"""

from __future__ import annotations

import pytest
import torch

verl_F = pytest.importorskip("verl.utils.torch_functional")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

from _stack_modules import holes_mask, rand  # noqa: E402
from cai_kernels.integrations import verl as adapter  # noqa: E402
from cai_kernels.integrations._patching import Unsupported  # noqa: E402

# veRL's own implementations, captured before any test patches them
VERL_F = {name: getattr(verl_F, name) for name in ("logprobs_from_logits", "entropy_from_logits", "masked_whiten")}
VERL = {name: getattr(core_algos, name) for name in ("kl_penalty", "compute_gae_advantage_return",
                                                     "compute_policy_loss_vanilla", "compute_value_loss")}


class ActorConfig(dict):
    """What compute_policy_loss_vanilla reads off veRL's ActorConfig (attributes, .get, global_batch_info)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def _config(**overrides):
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         global_batch_info={})
    config.update(overrides)
    return config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_from_logits(dtype):
    logits = rand(3, 5, 33, seed=1, scale=3.0, dtype=dtype)
    labels = torch.randint(0, 33, (3, 5), generator=torch.Generator().manual_seed(2))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for ours, theirs in ((adapter.logprobs_from_logits(logits, labels), VERL_F["logprobs_from_logits"](logits, labels)),
                         (adapter.entropy_from_logits(logits), VERL_F["entropy_from_logits"](logits))):
        assert ours.dtype == theirs.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)


def test_logprobs_gradient():
    base = rand(2, 4, 17, seed=3, scale=2.0)
    labels = torch.randint(0, 17, (2, 4), generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (adapter.logprobs_from_logits, VERL_F["logprobs_from_logits"]):
        x = base.clone().requires_grad_(True)
        (fn(x, labels) * torch.linspace(-1, 1, 8).view(2, 4)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    values, mask = rand(4, 9, seed=5, scale=2.0) + 3.0, holes_mask(4, 9, seed=6)
    ours, theirs = adapter.masked_whiten(values, mask, shift_mean), VERL_F["masked_whiten"](values, mask, shift_mean)
    on = mask.bool()
    torch.testing.assert_close(ours[on], theirs[on], rtol=1e-5, atol=1e-5)
    assert (ours[~on] == 0).all()


def test_masked_whiten_errors_like_verl():
    values = torch.randn(2, 3)
    for count, message in ((0, "At least one element"), (1, "The sum of the mask is one")):
        mask = torch.zeros(2, 3)
        mask.view(-1)[:count] = 1
        for fn in (adapter.masked_whiten, VERL_F["masked_whiten"]):
            with pytest.raises(ValueError, match=message):
                fn(values, mask)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+",
                                  "k2+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_every_name(name, dtype):
    # log-ratios over [-30, 30]: low_var_kl's +-20 and +-10 clamps are both hit
    logp0, ref0 = rand(4, 8, seed=7, scale=12.0, dtype=dtype), rand(4, 8, seed=8, scale=12.0, dtype=dtype)
    outs, grads = [], []
    for fn in (adapter.kl_penalty, VERL["kl_penalty"]):
        logp, ref = logp0.clone().requires_grad_(True), ref0.clone().requires_grad_(True)
        kl = fn(logp, ref, name)
        (kl.float() * torch.linspace(0.1, 1, 32).view(4, 8)).sum().backward()
        outs.append(kl)
        grads.append((logp.grad, ref.grad))
    assert outs[0].dtype == outs[1].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if name.startswith(("low_var_kl", "k3")):
        assert outs[1].float().max() == 10.0  # veRL's output clamp is exercised


def test_kl_penalty_full_is_not_implemented():
    for fn in (adapter.kl_penalty, VERL["kl_penalty"]):
        with pytest.raises(NotImplementedError):
            fn(torch.zeros(1, 2), torch.zeros(1, 2), "full")


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_skip_and_carry(gamma, lam):
    mask = holes_mask(5, 12, seed=9)
    rewards, values = rand(5, 12, seed=10), rand(5, 12, seed=11)
    rewards = rewards.masked_fill(mask == 0, 123.0)  # observation tokens' entries are never read
    values = values.masked_fill(mask == 0, -7.0)
    ours = adapter.compute_gae_advantage_return(rewards, values, mask, torch.tensor(gamma), torch.tensor(lam))
    theirs = VERL["compute_gae_advantage_return"](rewards, values, mask, gamma, lam)
    on = mask.bool()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a[on], b[on], rtol=1e-5, atol=1e-5)
        assert (a[~on] == 0).all()


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                 "seq-mean-token-mean"])
@pytest.mark.parametrize("global_info", [False, True])
def test_policy_loss_vanilla(agg, global_info):
    mask = holes_mask(6, 10, seed=12)
    old, logp0 = rand(6, 10, seed=13), rand(6, 10, seed=14)
    advantages = rand(6, 10, seed=15, scale=2.0)
    info = {"dp_size": 2, "batch_num_tokens": 2 * int(mask.sum()) + 3, "global_batch_size": 13,
            "loss_scale_factor": 7} if global_info else {}
    config = _config(global_batch_info=info)
    outs, grads = [], []
    for fn in (adapter.compute_policy_loss_vanilla, VERL["compute_policy_loss_vanilla"]):
        logp = logp0.clone().requires_grad_(True)
        loss, metrics = fn(old, logp, advantages, mask, agg, config)
        loss.backward()
        outs.append((loss, metrics))
        grads.append(logp.grad)
    (ours, our_metrics), (theirs, their_metrics) = outs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert our_metrics.keys() == their_metrics.keys()
    for key in their_metrics:
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-5, abs=1e-6), key
    assert their_metrics["actor/pg_clipfrac"] > 0 and their_metrics["actor/pg_clipfrac_lower"] > 0


def test_policy_loss_rollout_weights_fall_back_when_patched():
    mask = holes_mask(3, 5, seed=16)
    old, logp, adv = rand(3, 5, seed=17), rand(3, 5, seed=18), rand(3, 5, seed=19)
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(20))
    with pytest.raises(Unsupported, match="rollout_is_weights"):
        adapter.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", _config(), weights)
    with adapter.apply_to_verl():
        patched = core_algos.compute_policy_loss_vanilla(old, logp, adv, mask, "token-mean", _config(), weights)
    expected = VERL["compute_policy_loss_vanilla"](old, logp, adv, mask, "token-mean", _config(), weights)
    torch.testing.assert_close(patched[0], expected[0])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"])
def test_value_loss(agg):
    mask = holes_mask(5, 7, seed=21)
    vpreds0, returns, values = rand(5, 7, seed=22), rand(5, 7, seed=23), rand(5, 7, seed=24)
    outs, grads = [], []
    for fn in (adapter.compute_value_loss, VERL["compute_value_loss"]):
        vpreds = vpreds0.clone().requires_grad_(True)
        loss, clipfrac = fn(vpreds, returns, values, mask, 0.3, agg)
        loss.backward()
        outs.append((loss, clipfrac))
        grads.append(vpreds.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_apply_to_verl_patches_registries_and_undoes():
    handle = adapter.apply_to_verl()
    try:
        assert core_algos.kl_penalty.__wrapped__ is adapter.kl_penalty
        assert core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla
        assert core_algos.get_adv_estimator_fn("gae") is core_algos.compute_gae_advantage_return
        assert verl_F.masked_whiten.__wrapped__ is adapter.masked_whiten
        assert "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']" in handle.patched
    finally:
        handle.undo()
    assert core_algos.get_policy_loss_fn("vanilla") is VERL["compute_policy_loss_vanilla"]
    assert core_algos.get_adv_estimator_fn("gae") is VERL["compute_gae_advantage_return"]
    assert all(getattr(core_algos, name) is fn for name, fn in VERL.items())
    assert all(getattr(verl_F, name) is fn for name, fn in VERL_F.items())
