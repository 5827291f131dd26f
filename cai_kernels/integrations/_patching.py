"""Patch a stack's functions in place, everywhere they were imported, and undo it.

`from .utils import selective_log_softmax` copies the function object into the importing module, so
replacing it in the defining module alone leaves every trainer that imported it on the old one
(Liger-Kernel patches per module for the same reason). `patch_package` therefore walks every
loaded module of the package and replaces each global that *is* the original object, the entries
of module-level registries (dicts, as veRL's ``POLICY_LOSS_REGISTRY``) that are, and the explicit
class attributes it is given. Modules the stack imports later read the patched defining module.

The returned `PatchHandle` undoes exactly what it changed: it is a context manager and has
``.undo()``. Undo also re-scans, so a module imported while the patch was active (and so holding
the adapter) gets the original back. Applying twice is harmless: a name already holding an adapter
is left alone (and the second handle's undo leaves it to the first).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

ADAPTER_MARK = "__cai_kernels_adapter__"


class Unsupported(NotImplementedError):
    """An option of the stack's function that the cai_kernels adapter does not cover.

    Raised before any work is done. Called directly, the adapter raises it; patched into a stack,
    the call goes to the stack's own function instead (see `with_fallback`).
    """


def with_fallback(adapter: Callable, original: Callable) -> Callable:
    """`adapter`, but calls that raise `Unsupported` run `original` (the stack's own code)."""

    def patched(*args, **kwargs):
        try:
            return adapter(*args, **kwargs)
        except Unsupported:
            return original(*args, **kwargs)

    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(patched, attr, getattr(adapter, attr, None))
    patched.__wrapped__ = adapter
    setattr(patched, ADAPTER_MARK, True)
    return patched


def mark_adapter(obj):
    setattr(obj, ADAPTER_MARK, True)
    return obj


def is_adapter(obj) -> bool:
    return getattr(obj, ADAPTER_MARK, False) is True


@dataclass
class PatchHandle:
    """What one ``apply_to_*`` call replaced; ``undo()`` (or leaving the ``with`` block) restores it."""

    package: str
    # (original object, replacement) pairs found by identity in the package's modules
    replacements: list[tuple[Any, Any]] = field(default_factory=list)
    # (owner, attribute or key, original value, label) of each change, in order
    changes: list[tuple[Any, Any, Any, str]] = field(default_factory=list)
    active: bool = True

    @property
    def patched(self) -> list[str]:
        """Human-readable names of the patched places, e.g. ``trl.trainer.utils.selective_log_softmax``."""
        return [label for *_, label in self.changes]

    def undo(self) -> None:
        if not self.active:
            return
        for owner, key, original, _ in reversed(self.changes):
            if isinstance(owner, dict):
                owner[key] = original
            else:
                setattr(owner, key, original)
        # modules imported while the patch was active copied the adapters: give them the originals
        back = {id(new): original for original, new in self.replacements}
        for module in _package_modules(self.package):
            for name, value in list(vars(module).items()):
                if id(value) in back:
                    setattr(module, name, back[id(value)])
        self.changes.clear()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _package_modules(package: str) -> list:
    prefix = package + "."
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == package or name.startswith(prefix))]


def import_modules(names: list[str]) -> None:
    """Import the stack modules that hold the names to patch; one that fails to import is skipped.

    Stacks import GPU-only dependencies in some modules (DeepSpeed, vLLM, flash-attn): where those
    are missing the other modules are still patched. A failure other than a missing module warns.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        except Exception as err:  # a stack module that breaks on import for another reason
            warnings.warn(f"cai_kernels.integrations: not patching {name}, it failed to import: {err!r}",
                          RuntimeWarning, stacklevel=3)


def patch_package(package: str, replacements: list[tuple[Any, Any]],
                  attributes: list[tuple[Any, str, Any]] = ()) -> PatchHandle:
    """Replace every reference to each original in ``package``'s loaded modules by its replacement.

    replacements: (original object, replacement) pairs, matched by identity in module globals and
        in the values of module-level dicts (registries).
    attributes: (owner, attribute, replacement) triples set explicitly, e.g. a method on a class.
    Originals that already are adapters (an earlier, still active patch) are skipped.
    """
    handle = PatchHandle(package)
    todo = {id(original): (original, new) for original, new in replacements if not is_adapter(original)}
    handle.replacements = list(todo.values())
    for module in _package_modules(package):
        for name, value in list(vars(module).items()):
            if id(value) in todo:
                handle.changes.append((module, name, value, f"{module.__name__}.{name}"))
                setattr(module, name, todo[id(value)][1])
            elif isinstance(value, dict) and not name.startswith("__"):
                for key, entry in list(value.items()):
                    if id(entry) in todo:
                        handle.changes.append((value, key, entry, f"{module.__name__}.{name}[{key!r}]"))
                        value[key] = todo[id(entry)][1]
    for owner, attribute, new in attributes:
        current = owner.__dict__.get(attribute) if isinstance(owner, type) else getattr(owner, attribute)
        if is_adapter(current):
            continue
        handle.changes.append((owner, attribute, current, f"{owner.__module__}.{owner.__qualname__}.{attribute}"))
        setattr(owner, attribute, new)
    return handle
