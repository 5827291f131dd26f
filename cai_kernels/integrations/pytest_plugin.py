"""A pytest plugin that runs a stack's own test files with the cai_kernels adapters patched in.

    pytest -p cai_kernels.integrations.pytest_plugin --cai-patch trl      path/to/trl/tests/test_utils.py
    pytest -p cai_kernels.integrations.pytest_plugin --cai-patch verl     .../tests/trainer/ppo
    pytest -p cai_kernels.integrations.pytest_plugin --cai-patch openrlhf --cai-stub-missing deepspeed ...

``--cai-patch STACK`` calls ``apply_to_STACK()`` when pytest configures, before any test module is
imported (so ``from trl.trainer.utils import selective_log_softmax`` in a test gets the adapter).
Some stacks' tests load the stack's modules a second time from their source files under private
names (OpenRLHF: ``spec_from_file_location("_openrlhf_kl_test.utils", .../openrlhf/models/utils.py)``);
those copies are patched as they load, with the same adapters. ``--cai-patch none`` (the default)
patches nothing: the same command gives the unpatched baseline.

``--cai-stub-missing NAME`` puts an empty module NAME in place of a dependency that is not installed
(OpenRLHF's ``models/utils.py`` imports DeepSpeed at the top, for a helper none of the loss / KL
tests call). ``--cai-outcomes FILE`` writes JSON: every test's outcome (passed / failed / skipped /
error, collection errors included) and what was patched.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

STACKS = ("trl", "verl", "openrlhf")


def pytest_addoption(parser):
    group = parser.getgroup("cai_kernels", "cai_kernels adapters")
    group.addoption("--cai-patch", choices=STACKS + ("none",), default="none",
                    help="apply cai_kernels.integrations.apply_to_STACK() before the tests import")
    group.addoption("--cai-stub-missing", action="append", default=[], metavar="MODULE",
                    help="an empty stand-in for MODULE when it is not installed (repeatable)")
    group.addoption("--cai-outcomes", default=None, metavar="FILE", help="write every test's outcome as JSON")


class _State:
    def __init__(self, config):
        self.stack = config.getoption("--cai-patch")
        self.outcomes: dict[str, str] = {}
        self.patched: list[str] = []
        self.not_patched: dict[str, str] = {}
        self.copies: list[str] = []
        self.handle = None


_state: _State | None = None


def _stub(name: str) -> None:
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers see a module
    sys.modules[name] = module


def _hook_module_copies(stack: str, state: _State) -> None:
    """Patch modules executed from the stack's source files under another name, as they load."""
    from . import _patching

    adapters = importlib.import_module(f"cai_kernels.integrations.{stack}")
    targets = adapters._targets()
    spec = importlib.util.find_spec(stack)
    root = Path(list(spec.submodule_search_locations)[0]).resolve()
    seen: dict[int, object] = {}
    original_exec = importlib.machinery.SourceFileLoader.exec_module

    def exec_module(loader, module):
        original_exec(loader, module)
        path = Path(getattr(module, "__file__", None) or "").resolve()
        if root not in path.parents:
            return
        parts = path.relative_to(root).with_suffix("").parts
        canonical = ".".join((stack,) + (parts[:-1] if parts[-1] == "__init__" else parts))
        if module.__name__ != canonical:
            for label in _patching.patch_module_copy(module, canonical, targets, seen):
                if label not in state.copies:
                    state.copies.append(label)

    importlib.machinery.SourceFileLoader.exec_module = exec_module


def pytest_configure(config):
    global _state
    if not hasattr(config.option, "cai_patch"):
        return
    _state = _State(config)
    for name in config.getoption("--cai-stub-missing"):
        _stub(name)
    if _state.stack != "none":
        import warnings

        from . import PatchWarning

        patcher = getattr(importlib.import_module("cai_kernels.integrations"), f"apply_to_{_state.stack}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PatchWarning)  # reported in the summary and the outcomes file
            _state.handle = patcher()
        _state.patched, _state.not_patched = list(_state.handle.patched), dict(_state.handle.not_patched)
        _hook_module_copies(_state.stack, _state)


def _record(nodeid: str, outcome: str) -> None:
    if _state is None:
        return
    previous = _state.outcomes.get(nodeid)
    if previous in ("failed", "error"):
        return  # a failing teardown after a pass, or the call after a setup error, does not overwrite it
    _state.outcomes[nodeid] = outcome


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid, "error")


def pytest_runtest_logreport(report):
    if report.when == "call":
        _record(report.nodeid, "passed" if report.passed else "skipped" if report.skipped else "failed")
    elif report.failed:
        _record(report.nodeid, "error")
    elif report.skipped and report.when == "setup":
        _record(report.nodeid, "skipped")


def pytest_terminal_summary(terminalreporter):
    if _state is None or _state.stack == "none":
        return
    write = terminalreporter.write_line
    from ._patching import CALLS

    write(f"cai_kernels: patched {len(_state.patched)} place(s) of {_state.stack}, "
          f"{len(_state.copies)} in module copies the tests loaded")
    for (name, kind), count in sorted(CALLS.items()):
        write(f"cai_kernels: {count:6d} call(s) of {name}: {'ours' if kind == 'adapter' else 'fell back to the stack'}")
    for target, why in _state.not_patched.items():
        write(f"cai_kernels: NOT patched {target}: {why}")


def pytest_unconfigure(config):
    if _state is None:
        return
    from ._patching import CALLS

    path = config.getoption("--cai-outcomes")
    if path:
        calls = {f"{name} ({kind})": count for (name, kind), count in sorted(CALLS.items())}
        Path(path).write_text(json.dumps({
            "stack": _state.stack, "patched": _state.patched, "not_patched": _state.not_patched,
            "copies": _state.copies, "calls": calls, "outcomes": _state.outcomes}, indent=1))
