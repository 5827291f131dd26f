"""The in-place patcher behind apply_to_trl / apply_to_openrlhf / apply_to_verl, on a fake package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import warnings

import pytest

from cai_kernels.integrations._patching import (PatchWarning, Target, Unsupported, apply_targets, is_adapter,
                                                patch_package, with_fallback)


def original(x):
    return ("original", x)


def adapter(x):
    if x == "odd":
        raise Unsupported("odd input")
    return ("adapter", x)


class Owner:
    def method(self, x):
        return ("method", x)


@pytest.fixture
def fake_package():
    """fakestack (defines `original`), fakestack.trainer (imported it), fakestack.registry (a dict of it)."""
    root = types.ModuleType("fakestack")
    root.original = original
    trainer = types.ModuleType("fakestack.trainer")
    trainer.original = original
    trainer.renamed = original  # `from .utils import original as renamed`
    registry = types.ModuleType("fakestack.registry")
    registry.LOSSES = {"vanilla": original, "other": len}
    modules = {m.__name__: m for m in (root, trainer, registry)}
    sys.modules.update(modules)
    yield modules
    for name in modules:
        sys.modules.pop(name, None)
    sys.modules.pop("fakestack.late", None)


def test_patch_replaces_every_reference_and_undo_restores(fake_package):
    new = with_fallback(adapter, original)
    handle = patch_package("fakestack", [(original, new)], [(Owner, "method", new)])
    root, trainer, registry = fake_package.values()
    assert root.original is new and trainer.original is new and trainer.renamed is new
    assert registry.LOSSES["vanilla"] is new and registry.LOSSES["other"] is len
    assert Owner.method is new
    assert sorted(handle.patched) == sorted([
        "fakestack.original", "fakestack.trainer.original", "fakestack.trainer.renamed",
        "fakestack.registry.LOSSES['vanilla']", f"{Owner.__module__}.Owner.method"])
    assert trainer.original(1) == ("adapter", 1)
    assert trainer.original("odd") == ("original", "odd")  # Unsupported: the stack's own code runs
    # a module imported while the patch is active copies the adapter; undo gives it the original
    late = types.ModuleType("fakestack.late")
    late.original = root.original
    sys.modules["fakestack.late"] = late
    handle.undo()
    assert root.original is original and trainer.renamed is original and late.original is original
    assert registry.LOSSES["vanilla"] is original and Owner.__dict__["method"].__name__ == "method"
    assert Owner().method(2) == ("method", 2)
    handle.undo()  # a second undo does nothing


def test_context_manager_and_nested_apply(fake_package):
    root = fake_package["fakestack"]
    with patch_package("fakestack", [(original, with_fallback(adapter, original))]) as outer:
        patched = root.original
        assert is_adapter(patched)
        # applying again while active: the adapter is not wrapped twice, the inner undo leaves it in place
        with patch_package("fakestack", [(root.original, with_fallback(adapter, root.original))]) as inner:
            assert root.original is patched and inner.changes == []
        assert root.original is patched and outer.active
    assert root.original is original


def test_adapter_called_directly_raises_unsupported():
    with pytest.raises(Unsupported, match="odd input"):
        adapter("odd")
    assert issubclass(Unsupported, NotImplementedError)


def test_importing_the_adapters_imports_no_stack():
    code = textwrap.dedent("""
        import sys
        import cai_kernels, cai_kernels.integrations
        import cai_kernels.integrations.trl, cai_kernels.integrations.openrlhf, cai_kernels.integrations.verl
        loaded = sorted(m for m in ("transformers", "trl", "openrlhf", "verl", "ray") if m in sys.modules)
        print(",".join(loaded))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_apply_targets_records_and_warns_what_it_cannot_patch(fake_package):
    targets = [Target("fakestack.trainer", "original", lambda orig: with_fallback(adapter, orig)),
               Target("fakestack.trainer", "renamed_in_a_later_version", lambda orig: orig),
               Target("fakestack.broken", "original", lambda orig: orig),
               Target("fakestack.broken.child", "original", lambda orig: orig)]
    sys.modules["fakestack.broken"] = None  # importing it raises ImportError
    try:
        with pytest.warns(PatchWarning) as caught:
            handle = apply_targets("fakestack", targets, ["fakestack.trainer", "fakestack.broken"])
    finally:
        del sys.modules["fakestack.broken"]
    try:
        assert "fakestack.trainer.original" in handle.patched
        assert "has no renamed_in_a_later_version" in handle.not_patched["fakestack.trainer.renamed_in_a_later_version"]
        broken = handle.not_patched["fakestack.broken.original"]
        assert "fakestack.broken failed to import: ModuleNotFoundError" in broken
        # a submodule of a package that failed to import: the package's failure is the reason
        assert handle.not_patched["fakestack.broken.child.original"] == handle.not_patched["fakestack.broken.original"]
        assert len(caught) == 1 and all(target in str(caught[0].message) for target in handle.not_patched)
    finally:
        handle.undo()


def test_apply_targets_silent_when_everything_is_patched(fake_package):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        target = Target("fakestack", "original", lambda orig: with_fallback(adapter, orig))
        handle = apply_targets("fakestack", [target], ["fakestack"])
    assert handle.not_patched == {} and handle.patched
    handle.undo()


def test_every_patcher_warns_when_a_stack_module_fails_to_import():
    """TRL's trainer utils, veRL's core_algos and OpenRLHF's models made unimportable: each patcher
    warns (PatchWarning) and lists the functions it left to the stack."""
    code = textwrap.dedent("""
        import sys, warnings
        for blocked in ("trl.trainer.utils", "verl.trainer.ppo.core_algos", "flash_attn"):
            sys.modules[blocked] = None
        from cai_kernels.integrations import PatchWarning, apply_to_openrlhf, apply_to_trl, apply_to_verl
        expect = {apply_to_trl: "trl.trainer.utils.selective_log_softmax",
                  apply_to_verl: "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla",
                  apply_to_openrlhf: "openrlhf.models.utils.compute_approx_kl"}
        for patcher, target in expect.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handle = patcher()
            warned = [str(w.message) for w in caught if issubclass(w.category, PatchWarning)]
            assert len(warned) == 1 and target in warned[0], (patcher.__name__, warned)
            assert "failed to import" in handle.not_patched[target], handle.not_patched
            assert caught[0].filename == "<string>", caught[0].filename  # points at the caller
            handle.undo()
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
