"""The registry and the layout it names: every op under one name in every layer, backend choice (device,
per-call override, env var, loud errors for impossible requests), the kernels' calling convention."""

import importlib
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import cai_kernels
from cai_kernels import _extension, _registry
from cai_kernels.ops._kernel_op import KernelOp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_op_names_all_its_implementations():
    for name, op in _registry.OPS.items():
        assert hasattr(cai_kernels, name), f"{name} is registered but not public"
        ops_module = importlib.import_module(op.ops_module)
        reference = getattr(importlib.import_module(op.reference_module), name)
        assert ops_module.reference is reference, f"{op.ops_module} must run {op.reference_module}.{name}"
        assert getattr(cai_kernels.reference, name) is reference
        cpp = os.path.join(ROOT, "csrc", "cpu", f"{name}.cpp")
        triton_file = os.path.join(ROOT, "cai_kernels", "triton", f"{name}.py")
        assert os.path.exists(cpp) == bool(op.cpu), cpp
        assert os.path.exists(triton_file) == op.triton, triton_file
        assert (op.cpu and op.triton) or op.parts, f"{name} has no kernels of its own and no parts"
        assert all(part in _registry.OPS for part in op.parts)
        for path in (os.path.join(ROOT, "tests", f"test_{name}.py"),
                     os.path.join(ROOT, "benchmarks", f"test_bench_{name}.py")):
            assert os.path.exists(path), path


def test_cpu_schemas_follow_the_parameter_bundles():
    # The custom ops' schemas are written from the bundles (cai_kernels/_params.py); each C++ kernel's
    # m.def schema must name the same arguments, of the same types, in the same order (minus the backend).
    assert _extension.status().loaded, _extension.status().reason
    found = 0
    for kernel_op in KernelOp.instances:
        if kernel_op.kernel not in _registry.OPS[kernel_op.op].cpu:
            continue
        custom = [(a.name, str(a.type)) for a in kernel_op.custom_op._opoverload._schema.arguments]
        cpp_schema = getattr(torch.ops.cai_kernels_cpu, kernel_op.kernel).default._schema
        cpp = [(a.name, str(a.type)) for a in cpp_schema.arguments]
        assert custom[-1] == ("backend", "str") and cpp == custom[:-1], (kernel_op.kernel, cpp, custom)
        found += 1
    assert found == sum(len(op.cpu) for op in _registry.OPS.values())


def test_kernels_never_import_the_reference_and_ops_find_kernels_through_the_registry():
    triton_dir, ops_dir = os.path.join(ROOT, "cai_kernels", "triton"), os.path.join(ROOT, "cai_kernels", "ops")
    for name in os.listdir(triton_dir):
        if name.endswith(".py"):
            source = open(os.path.join(triton_dir, name)).read()
            assert not re.search(r"^\s*(from|import) .*reference", source, re.M), f"triton/{name} imports the reference"
    for name in os.listdir(ops_dir):
        if name.endswith(".py"):
            source = open(os.path.join(ops_dir, name)).read()
            assert not re.search(r"cpu_kernels|from \.\.triton|import triton", source), \
                f"ops/{name} finds kernels itself instead of through _registry.kernels"


def test_extension_is_built_and_loaded():
    # `make test` builds it: on this machine a missing extension is a failed install, not a skip.
    status = _extension.status()
    assert status.loaded, status.reason
    for name in _registry.OPS:
        assert _registry.status(name, "cpu")["cpu"][0], _registry.status(name, "cpu")["cpu"][1]


def test_auto_follows_the_device(monkeypatch):
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    assert _registry.select_backend("token_logprobs", torch.device("cpu")) == "cpu"


def test_env_var_and_per_call_override(monkeypatch):
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    assert _registry.select_backend("token_logprobs", torch.device("cpu")) == "reference"
    assert _registry.select_backend("token_logprobs", torch.device("cpu"), "cpu") == "cpu"
    monkeypatch.setenv(_registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="CAI_KERNELS_BACKEND must be one of"):
        _registry.select_backend("token_logprobs", torch.device("cpu"))


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="backend 'cpu' cannot run token_logprobs on cuda tensors"):
        _registry.select_backend("token_logprobs", torch.device("cuda"), "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _registry.select_backend("token_logprobs", torch.device("cpu"), "triton")


def test_env_var_changes_the_result_path(monkeypatch):
    op_module = importlib.import_module("cai_kernels.ops.token_logprobs")
    calls = []
    real = op_module.reference
    monkeypatch.setattr(op_module, "reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, targets = torch.randn(4, 50), torch.randint(0, 50, (4,))
    monkeypatch.setenv(_registry.ENV_VAR, "reference")
    cai_kernels.token_logprobs(logits, targets)
    assert calls == [1]
    monkeypatch.setenv(_registry.ENV_VAR, "cpu")
    cai_kernels.token_logprobs(logits, targets)
    assert calls == [1], "the cpu backend must not run the reference"


def test_fallback_without_extension_warns_once_and_still_works():
    # A fresh interpreter that cannot load any C++ build: the library must fall back, and say so once.
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import cai_kernels\n"
        "from cai_kernels import _extension\n"
        "assert not _extension.status().loaded, _extension.status()\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        out = cai_kernels.token_logprobs(torch.randn(3, 9), torch.tensor([1, 2, 3]))\n"
        "msgs = [str(w.message) for w in seen if 'reference' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert out.shape == (3,)\n"
        "print('ok')\n"
    )
    env = {"CAI_KERNELS_CPU_CAPABILITY": "no_such_build", "PATH": ""}
    import os
    env = {**os.environ, **env}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_info_command_lists_every_op_and_backend():
    run = subprocess.run([sys.executable, "-m", "cai_kernels", "info"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in _registry.OPS:
        assert name in run.stdout
    assert "C++ extension: C++ kernels built for" in run.stdout
    assert "reference" in run.stdout and "triton" in run.stdout


def test_cpu_kernel_errors_keep_their_python_types():
    """A bad value found inside a C++ kernel is a ValueError with the kernel's message (without the
    transport prefix, csrc/cpu/errors.h); any other kernel failure stays a RuntimeError."""
    from cai_kernels._extension import VALUE_ERROR_PREFIX, cpu_kernels, status

    if not status().loaded:
        pytest.fail("the C++ extension should be built in the test environment")
    logits, bad = torch.randn(2, 3, 5), torch.tensor([[0, 1, 5], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"^targets must lie in \[0, 5\)") as caught:
        cai_kernels.token_logprobs(logits, bad, backend="cpu")
    assert not str(caught.value).startswith(VALUE_ERROR_PREFIX)
    with pytest.raises(RuntimeError) as caught:  # a 2-D view where the kernel takes (outer, inner, T)
        cpu_kernels.kl_penalty_fwd(torch.zeros(2, 3), torch.zeros(2, 3), 0, -1.0, 1.0, -1.0, 1.0)
    assert not isinstance(caught.value, ValueError)
