"""Backend choice: device, per-call override, env var, and loud errors for impossible requests."""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import cai_kernels
from cai_kernels import _extension, _registry


def test_every_op_names_all_its_implementations():
    for name, op in _registry.OPS.items():
        assert hasattr(cai_kernels, name), f"{name} is registered but not public"
        module, function = op.reference.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))
        assert op.cpu and op.triton


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
    real = op_module.reference.token_logprobs
    monkeypatch.setattr(op_module.reference, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
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
