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

A patcher that cannot patch says so: every target it could not reach (its stack module failed to
import, e.g. OpenRLHF's ``openrlhf.models`` without flash-attn; or the installed version does not
define the name) is listed in ``handle.not_patched`` with the reason, and one `PatchWarning` names
them all. The stack's own code keeps running for those.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

ADAPTER_MARK = "__cai_kernels_adapter__"

# (adapter name, "adapter" | "fallback") -> calls of patched functions: shows a test harness that the
# stack's tests really ran our code (and how often the stack's own code ran instead)
CALLS: Counter = Counter()


class PatchWarning(RuntimeWarning):
    """An ``apply_to_*`` call left some of the stack's functions unpatched (see ``PatchHandle.not_patched``)."""


class Unsupported(NotImplementedError):
    """An option of the stack's function that the cai_kernels adapter does not cover.

    Raised before any work is done. Called directly, the adapter raises it; patched into a stack,
    the call goes to the stack's own function instead (see `with_fallback`).
    """


def with_fallback(adapter: Callable, original: Callable) -> Callable:
    """`adapter`, but calls that raise `Unsupported` run `original` (the stack's own code)."""

    name = getattr(adapter, "__qualname__", repr(adapter))

    def patched(*args, **kwargs):
        try:
            result = adapter(*args, **kwargs)
        except Unsupported:
            CALLS[name, "fallback"] += 1
            return original(*args, **kwargs)
        CALLS[name, "adapter"] += 1
        return result

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
    # target ("module.name") -> why it was not patched; the stack's own code runs for these
    not_patched: dict[str, str] = field(default_factory=dict)
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


def import_modules(names: list[str]) -> dict[str, str]:
    """Import the stack modules that hold the names to patch; returns {module: why it failed to import}.

    Stacks import GPU-only dependencies in some modules (DeepSpeed, vLLM, flash-attn): where those
    are missing the other modules are still patched, and the caller reports what it could not reach.
    """
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a stack module that breaks on import for another reason
            failed[name] = f"{name} failed to import: {type(err).__name__}: {err}"
    return failed


@dataclass(frozen=True)
class Target:
    """One thing a patcher replaces: ``module.name`` (a function or class), or ``module.Class.method``.

    make(original) -> replacement builds the adapter around the stack's original (its fallback).
    """

    module: str
    name: str  # "selective_log_softmax", or "RemoteExperienceMaker.get_advantages_and_returns"
    make: Callable[[Any], Any]

    @property
    def label(self) -> str:
        return f"{self.module}.{self.name}"

    def lookup(self, module) -> tuple[Any, Any] | None:
        """(owner, original) in this module (owner: the module, or the class for a method), or None."""
        owner_path, _, attribute = self.name.rpartition(".")
        owner = module
        for part in owner_path.split(".") if owner_path else ():
            owner = getattr(owner, part, None)
        if owner is None:
            return None
        original = vars(owner).get(attribute) if isinstance(owner, type) else getattr(owner, attribute, None)
        return None if original is None else (owner, original)


def apply_targets(package: str, targets: list[Target], import_names: list[str]) -> "PatchHandle":
    """Import ``import_names``, patch every target found, record (and warn about) the others."""
    failures = import_modules(import_names)
    replacements, attributes, not_patched = [], [], {}
    for target in targets:
        module = sys.modules.get(target.module)
        found = target.lookup(module) if module is not None else None
        if found is None:
            if module is None:
                reason = next((why for failed, why in failures.items()
                               if target.module == failed or target.module.startswith(failed + ".")),
                              f"{target.module} is not imported")
            else:
                reason = f"{target.module} has no {target.name} (another version of {package}?)"
            not_patched[target.label] = reason
            continue
        owner, original = found
        if owner is module:
            replacements.append((original, target.make(original)))
        else:  # a method: set on its class explicitly
            attributes.append((owner, target.name.rpartition(".")[2], mark_adapter(target.make(original))))
    return patch_package(package, replacements, attributes, not_patched=not_patched, warn_stacklevel=5)


def patch_module_copy(module, canonical: str, targets: list[Target], seen: dict[int, Any]) -> list[str]:
    """Patch a second copy of a stack module, loaded under another name (``canonical`` is its real name).

    Some stacks' own tests load their modules from the source files under private names (OpenRLHF:
    ``spec_from_file_location("_openrlhf_kl_test.utils", .../openrlhf/models/utils.py)``), so
    patching the real module does not reach them. ``seen`` maps id(original) -> adapter across the
    copies, so a copy that imported a patched copy's function keeps the adapter. Returns the labels
    patched. For test harnesses (the peer suites); nothing is undone.
    """
    patched = []
    for target in targets:
        if target.module != canonical:
            continue
        found = target.lookup(module)
        if found is None or is_adapter(found[1]):
            continue
        owner, original = found
        new = target.make(original)
        seen[id(original)] = new
        if owner is not module:
            setattr(owner, target.name.rpartition(".")[2], mark_adapter(new))
            patched.append(f"{module.__name__}.{target.name}")
    for name, value in list(vars(module).items()):
        if id(value) in seen:
            setattr(module, name, seen[id(value)])
            patched.append(f"{module.__name__}.{name}")
    return patched


def warn_not_patched(handle: "PatchHandle", stacklevel: int = 3) -> None:
    """One `PatchWarning` listing every target of ``handle`` that was not patched, with the reasons."""
    if not handle.not_patched:
        return
    by_reason: dict[str, list[str]] = {}
    for target, why in handle.not_patched.items():
        by_reason.setdefault(why, []).append(target)
    lines = "; ".join(f"{', '.join(targets)} ({why})" for why, targets in by_reason.items())
    warnings.warn(f"cai_kernels.integrations: {len(handle.not_patched)} function(s) of {handle.package} are NOT "
                  f"patched and run the stack's own code: {lines}", PatchWarning, stacklevel=stacklevel)


def patch_package(package: str, replacements: list[tuple[Any, Any]],
                  attributes: list[tuple[Any, str, Any]] = (), not_patched: dict[str, str] | None = None,
                  warn_stacklevel: int = 4) -> PatchHandle:
    """Replace every reference to each original in ``package``'s loaded modules by its replacement.

    replacements: (original object, replacement) pairs, matched by identity in module globals and
        in the values of module-level dicts (registries).
    attributes: (owner, attribute, replacement) triples set explicitly, e.g. a method on a class.
    Originals that already are adapters (an earlier, still active patch) are skipped.
    not_patched: {target: reason} the caller could not reach; kept on the handle and warned about
        once (`PatchWarning`).
    """
    handle = PatchHandle(package, not_patched=dict(not_patched or {}))
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
    warn_not_patched(handle, stacklevel=warn_stacklevel)
    return handle
