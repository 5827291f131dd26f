"""cai_kernels.integrations.openrlhf against OpenRLHF's own code (0.11.2 from PyPI, installed --no-deps).

See tests/_stack_modules.py for how OpenRLHF's modules load without DeepSpeed / flash-attn / Ray.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing
import warnings

import pytest
import torch

from _stack_modules import holes_mask, method_from_source, openrlhf_modules, rand

loaded = openrlhf_modules()
if loaded is None:
    pytest.skip("openrlhf is not installed (make install installs it with --no-deps)", allow_module_level=True)
orl_utils, orl_loss, EXPERIENCE_MAKER = loaded

from cai_kernels.integrations import openrlhf as adapter  # noqa: E402
from cai_kernels.integrations._patching import PatchWarning, Unsupported  # noqa: E402

# OpenRLHF's own implementations, captured before any test patches them
ORL = {name: getattr(orl_utils, name) for name in ("log_probs_from_logits", "compute_approx_kl", "compute_entropy")}
ORL_LOSS = {name: getattr(orl_loss, name) for name in ("PairWiseLoss", "LogExpLoss", "ValueLoss")}
_SCOPE = {"torch": torch, "Tuple": typing.Tuple, "List": typing.List, "Optional": typing.Optional}
ORL_GAE = method_from_source(EXPERIENCE_MAKER, "RemoteExperienceMaker", "get_advantages_and_returns", _SCOPE)
ORL_RETURNS = method_from_source(EXPERIENCE_MAKER, "RemoteExperienceMaker", "get_cumulative_returns", _SCOPE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits_matches_and_scales_in_place(dtype, temperature):
    base = rand(3, 5, 31, seed=1, scale=4.0, dtype=dtype)
    labels = torch.randint(0, 31, (3, 5), generator=torch.Generator().manual_seed(2))
    ours_logits, their_logits = base.clone(), base.clone()
    ours = adapter.log_probs_from_logits(ours_logits, labels, temperature)
    theirs = ORL["log_probs_from_logits"](their_logits, labels, temperature)
    assert ours.dtype == theirs.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.float(), theirs.float(), **tol)
    torch.testing.assert_close(ours_logits, their_logits)  # the same in-place division by the temperature


def test_log_probs_from_logits_gradient():
    base = rand(2, 4, 19, seed=3, scale=2.0)
    labels = torch.randint(0, 19, (2, 4), generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (adapter.log_probs_from_logits, ORL["log_probs_from_logits"]):
        x = base.clone().requires_grad_(True)
        (fn(x * 1.0, labels) * torch.linspace(-1, 1, 8).view(2, 4)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_compute_entropy_matches():
    logits = rand(3, 4, 27, seed=5, scale=3.0)
    torch.testing.assert_close(adapter.compute_entropy(logits), ORL["compute_entropy"](logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_approx_kl_matches_with_its_clamps(estimator, dtype):
    # log-ratios spread over [-15, 15]: both the k3 guard (-10) and the final +-10 clamp are hit
    logp0 = rand(4, 9, seed=6, scale=6.0, dtype=dtype)
    ref0 = rand(4, 9, seed=7, scale=6.0, dtype=dtype)
    outs, grads = [], []
    for fn in (adapter.compute_approx_kl, ORL["compute_approx_kl"]):
        logp, ref = logp0.clone().requires_grad_(True), ref0.clone().requires_grad_(True)
        kl = fn(logp, ref, kl_estimator=estimator)
        (kl * torch.linspace(0.1, 1, 36).view(4, 9)).sum().backward()
        outs.append(kl)
        grads.append((logp.grad, ref.grad))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    assert outs[1].abs().max() == 10.0  # the clamp is exercised
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl_unbiased_gradient(with_old):
    logp0, ref0, old = rand(3, 6, seed=8, scale=3.0), rand(3, 6, seed=9, scale=3.0), rand(3, 6, seed=10, scale=3.0)
    outs, grads = [], []
    for fn in (adapter.compute_approx_kl, ORL["compute_approx_kl"]):
        logp = logp0.clone().requires_grad_(True)
        kl = fn(logp, ref0, old if with_old else None, kl_estimator="k3", unbiased_gradient=True)
        kl.sum().backward()
        outs.append(kl)
        grads.append(logp.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_compute_approx_kl_unknown_estimator():
    with pytest.raises(ValueError, match="Unknown kl_estimator: k9"):
        adapter.compute_approx_kl(torch.zeros(2, 2), torch.zeros(2, 2), kl_estimator="k9")


@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_multiply_by_mask_semantics(gamma, lambd):
    """OpenRLHF's loop zeroes values/rewards off the mask and runs over every position (holes included)."""
    mask = holes_mask(5, 12, seed=11, empty_row=True)
    values, rewards = rand(5, 12, seed=12), rand(5, 12, seed=13)
    ours = adapter.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
    theirs = ORL_GAE(None, values, rewards, mask, gamma, lambd)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # holes really carry signal here (unlike skip-and-carry), so the test discriminates the two rules
    assert theirs[0][mask == 0].abs().max() > 1e-3
    torch.testing.assert_close(adapter.get_advantages_and_returns(values, rewards, None, gamma, lambd)[0],
                               ORL_GAE(None, values, rewards, None, gamma, lambd)[0], rtol=1e-5, atol=1e-5)


def test_cumulative_returns():
    mask = holes_mask(4, 10, seed=14, empty_row=True)
    rewards = rand(4, 10, seed=15)
    for gamma in (1.0, 0.9):
        torch.testing.assert_close(adapter.get_cumulative_returns(rewards, mask, gamma),
                                   ORL_RETURNS(None, rewards, mask, gamma), rtol=1e-5, atol=1e-5)


def test_gae_discount_outside_unit_interval_is_unsupported():
    with pytest.raises(Unsupported):
        adapter.get_advantages_and_returns(torch.zeros(1, 2), torch.zeros(1, 2), None, 1.5, 0.9)


@pytest.mark.parametrize("cls", ["PairWiseLoss", "LogExpLoss"])
@pytest.mark.parametrize("margin", [False, True])
def test_reward_model_losses(cls, margin):
    chosen0, reject0 = rand(16, seed=16, scale=3.0), rand(16, seed=17, scale=3.0)
    m = rand(16, seed=18).abs() if margin else None
    outs, grads = [], []
    for loss_cls in (getattr(adapter, cls), ORL_LOSS[cls]):
        chosen, reject = chosen0.clone().requires_grad_(True), reject0.clone().requires_grad_(True)
        loss = loss_cls()(chosen, reject, m)
        loss.backward()
        outs.append(loss)
        grads.append((chosen.grad, reject.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_log_exp_loss_stays_finite_where_openrlhf_overflows():
    chosen, reject = torch.tensor([0.0, 0.0]), torch.tensor([100.0, -100.0])
    assert torch.isinf(ORL_LOSS["LogExpLoss"]()(chosen, reject))
    torch.testing.assert_close(adapter.LogExpLoss()(chosen, reject), torch.tensor(50.0))


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("global_counts", [False, True])
def test_value_loss(clip_eps, token_level, global_counts):
    mask = holes_mask(6, 8, seed=19, empty_row=True)
    values0, old, returns = rand(6, 8, seed=20), rand(6, 8, seed=21), rand(6, 8, seed=22)
    kwargs = {}
    if global_counts:
        kwargs = {"dp_size": 2, "batch_num_tokens": 2.5 * float(mask.sum()), "global_batch_size": 9.0}
    outs, grads = [], []
    for loss_cls in (adapter.ValueLoss, ORL_LOSS["ValueLoss"]):
        values = values0.clone().requires_grad_(True)
        loss = loss_cls(clip_eps, token_level)(values, old, returns, mask, **kwargs)
        loss.backward()
        outs.append(loss)
        grads.append(values.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_apply_to_openrlhf_patches_and_undoes():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = adapter.apply_to_openrlhf()
    # whatever it could not reach (here RemoteExperienceMaker: its module needs vLLM glue) is listed and warned
    maker = "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker."
    for method in ("get_advantages_and_returns", "get_cumulative_returns"):
        assert (maker + method in handle.not_patched) != (maker + method in handle.patched)
    warned = [str(w.message) for w in caught if issubclass(w.category, PatchWarning)]
    assert len(warned) == (1 if handle.not_patched else 0)
    assert all(target in warned[0] for target in handle.not_patched)
    try:
        assert orl_utils.compute_approx_kl is not ORL["compute_approx_kl"]
        assert orl_utils.compute_approx_kl.__wrapped__ is adapter.compute_approx_kl
        assert orl_loss.PairWiseLoss is not ORL_LOSS["PairWiseLoss"]
        assert issubclass(orl_loss.ValueLoss, ORL_LOSS["ValueLoss"])  # isinstance checks keep working
        loss = orl_loss.PairWiseLoss()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]))
        torch.testing.assert_close(loss, ORL_LOSS["PairWiseLoss"]()(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])))
        assert "openrlhf.models.utils.log_probs_from_logits" in handle.patched
    finally:
        handle.undo()
    assert all(getattr(orl_utils, name) is fn for name, fn in ORL.items())
    assert all(getattr(orl_loss, name) is cls for name, cls in ORL_LOSS.items())


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
def test_patched_value_loss_class_constructs_and_matches(clip_eps, token_level):
    """The patched ValueLoss keeps OpenRLHF's __init__ (the adapter's bare super() pointed at a class
    the patched one does not inherit from: TypeError on construction)."""
    mask = holes_mask(4, 6, seed=25)
    values, old, returns = rand(4, 6, seed=26), rand(4, 6, seed=27), rand(4, 6, seed=28)
    expected = ORL_LOSS["ValueLoss"](clip_eps, token_level)(values, old, returns, mask)
    with warnings.catch_warnings():  # RemoteExperienceMaker may need Ray / vLLM glue that is not installed
        warnings.simplefilter("ignore", PatchWarning)
        handle = adapter.apply_to_openrlhf()
    try:
        patched = orl_loss.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level)
        assert isinstance(patched, ORL_LOSS["ValueLoss"]) and patched.clip_eps == clip_eps
        got = patched(values, old, returns, mask)
        assert type(patched).forward.__wrapped__ is adapter.ValueLoss.forward  # really ours
        for cls in ("PairWiseLoss", "LogExpLoss"):
            getattr(orl_loss, cls)()  # the other patched classes construct too
    finally:
        handle.undo()
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_apply_to_openrlhf_warns_and_lists_what_it_could_not_patch():
    """Without flash-attn (or DeepSpeed / PEFT) ``openrlhf.models`` does not import: nothing under it can
    be patched, and the patcher says so instead of returning an empty handle in silence."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["flash_attn"] = None  # `import flash_attn` raises ImportError, as on a machine without it
        from cai_kernels.integrations import PatchWarning, apply_to_openrlhf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = apply_to_openrlhf()
        messages = [str(w.message) for w in caught if issubclass(w.category, PatchWarning)]
        assert len(messages) == 1, messages
        assert handle.patched == [], handle.patched
        for name in ("log_probs_from_logits", "compute_entropy", "compute_approx_kl"):
            assert "openrlhf.models.utils." + name in handle.not_patched, handle.not_patched
            assert "openrlhf.models.utils." + name in messages[0]
        for name in ("PairWiseLoss", "LogExpLoss", "ValueLoss"):
            assert "failed to import" in handle.not_patched["openrlhf.models.loss." + name]
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
