"""The in-place patcher behind apply_to_trl / apply_to_openrlhf / apply_to_verl, on a fake package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

from cai_kernels.integrations._patching import Unsupported, is_adapter, patch_package, with_fallback


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
