"""Load the stacks' own modules for the adapter tests, installed from PyPI with --no-deps.

OpenRLHF's package ``__init__`` files import DeepSpeed, flash-attn, PEFT and Ray (GPU stacks that do
not install on a CPU machine), but the modules holding the functions we adapt need none of that
beyond an ``import deepspeed`` at the top of ``openrlhf/models/utils.py`` (used only by
``set_z3_leaf_modules``). So the tests import those modules directly: the ``openrlhf.models``
package is registered without running its ``__init__``, and an empty ``deepspeed`` module stands in
when DeepSpeed is absent. Methods of classes whose module cannot import (RemoteExperienceMaker needs
Ray and vLLM glue) are compiled from the installed source file on their own. Everything executed is
the stack's code as shipped on PyPI.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def openrlhf_modules():
    """(openrlhf.models.utils, openrlhf.models.loss, experience_maker.py path), or None if not installed."""
    root = _package_dir("openrlhf")
    if root is None:
        return None
    if importlib.util.find_spec("deepspeed") is None and "deepspeed" not in sys.modules:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    if "openrlhf.models" not in sys.modules:
        importlib.import_module("openrlhf")
        package = types.ModuleType("openrlhf.models")
        package.__path__ = [str(root / "models")]
        package.__package__ = "openrlhf.models"
        sys.modules["openrlhf.models"] = package
    utils = importlib.import_module("openrlhf.models.utils")
    loss = importlib.import_module("openrlhf.models.loss")
    return utils, loss, root / "trainer" / "ppo_utils" / "experience_maker.py"


def method_from_source(path: Path, class_name: str, method_name: str, namespace: dict):
    """Compile one method of a class from a source file, as a plain function (its decorators applied)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method_name:
                    module = ast.Module(body=[item], type_ignores=[])
                    scope = dict(namespace)
                    exec(compile(module, str(path), "exec"), scope)
                    return scope[method_name]
    raise LookupError(f"{class_name}.{method_name} not found in {path}")
