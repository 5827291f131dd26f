"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a on this GPU-less machine, with no
register spills, and the memory-bound ones issue 128-bit global loads on aligned inputs."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from cai_kernels import _registry  # noqa: E402


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-m", "cai_kernels.triton._aot", "--json"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.stdout.strip(), run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_family_is_checked(aot_results):
    families = {r["family"] for r in aot_results}  # one per op with Triton kernels (cai_kernels/triton/<op>.py)
    assert {name for name, op in _registry.OPS.items() if op.triton} <= families
    assert {r["arch"] for r in aot_results} == {"sm_80", "sm_90a"}


def test_compiles_without_spills_and_with_wide_loads(aot_results):
    failures = [r for r in aot_results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)[:5000]
    for r in aot_results:
        assert r["spill_bytes"] == 0 and r["registers"] > 0
