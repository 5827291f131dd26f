"""For the adapter tests: the stacks' own modules (installed from PyPI with --no-deps), and inputs.

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

import torch


def rand(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal noise (its own generator: a test's inputs do not depend on test order)."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def holes_mask(batch: int, steps: int, seed: int, *, empty_row: bool = False) -> torch.Tensor:
    """(B, T) int64 response masks of multi-turn rollouts: observation holes inside, right padding,
    every row starting with a response token (row 0 all masked with ``empty_row``)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, steps, generator=g) > 0.3
    lengths = torch.randint(2, steps + 1, (batch,), generator=g)
    mask &= torch.arange(steps) < lengths[:, None]
    mask[:, 0] = True
    if empty_row:
        mask[0] = False
    return mask.to(torch.int64)


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
    if "openrlhf.models" not in sys.modules:
        importlib.import_module("openrlhf")
        package = types.ModuleType("openrlhf.models")
        package.__path__ = [str(root / "models")]
        package.__package__ = "openrlhf.models"
        sys.modules["openrlhf.models"] = package
    # the stand-in exists only while utils.py imports: other libraries probe for a real DeepSpeed
    stand_in = importlib.util.find_spec("deepspeed") is None and "deepspeed" not in sys.modules
    if stand_in:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        utils = importlib.import_module("openrlhf.models.utils")
        loss = importlib.import_module("openrlhf.models.loss")
    finally:
        if stand_in:
            del sys.modules["deepspeed"]
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
