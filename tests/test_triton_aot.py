"""Every Triton kernel compiles ahead of time for sm_80 and sm_90a on this GPU-less machine, with no
register spills, the memory-bound ones issue 128-bit global loads on aligned inputs, and the GEMM
kernels of the fused LM head (triton/linear_head.py) issue tensor-core instructions: warpgroup MMA
(HGMMA) for sm_90a, HMMA for sm_80.

CAI_AOT_TRITON_SITE=<folder> also runs the checks with the Triton installed in that folder (e.g. the
GPU image's triton 3.6: ``pip install --no-deps --target <folder> triton==3.6.0``)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from cai_kernels import _registry  # noqa: E402


SITES = [None] + ([os.environ["CAI_AOT_TRITON_SITE"]] if os.environ.get("CAI_AOT_TRITON_SITE") else [])


def run_aot(site: str | None, *families: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    args = [arg for family in families for arg in ("--family", family)]
    run = subprocess.run([sys.executable, "-m", "cai_kernels.triton._aot", "--json", *args], capture_output=True,
                         text=True, env=env, timeout=1500)
    assert run.stdout.strip(), run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def aot_results():
    return run_aot(None)


def test_every_family_is_checked(aot_results):
    families = {r["family"] for r in aot_results}  # one per op with Triton kernels (cai_kernels/triton/<op>.py)
    assert {name for name, op in _registry.OPS.items() if op.triton} | {"linear_head"} <= families
    assert {r["arch"] for r in aot_results} == {"sm_80", "sm_90a"}


def test_compiles_without_spills_and_with_wide_loads(aot_results):
    failures = [r for r in aot_results if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)[:5000]
    for r in aot_results:
        assert r["spill_bytes"] == 0 and r["registers"] > 0


def check_tensor_cores(results: list[dict]) -> None:
    """The fused LM head's GEMM kernels (forward, dz, gradients) at the launcher's H100 / H200 and A100
    blockings: HGMMA on sm_90a, HMMA on sm_80, no spills, operand tiles staged by 16-byte cp.async."""
    gemms = [r for r in results if r["family"] == "linear_head" and r["tensor_core_op"]]
    for arch, op in (("sm_90a", "HGMMA"), ("sm_80", "HMMA")):
        kernels = {r["kernel"] for r in gemms if r["arch"] == arch}
        assert kernels == {"linear_head_fwd_kernel", "linear_head_dlogits_kernel", "linear_head_grad_kernel"}, kernels
    failures = [r for r in gemms if r["error"] or r["spill_bytes"] != 0
                or not any(name.split(".")[0] == r["tensor_core_op"] for name in r["matrix_ops"])
                or not r["operands_pipelined"]]  # every operand tile a 16-byte cp.async copy (TTGIR)
    assert not failures, json.dumps(failures, indent=1)[:5000]
    for r in gemms:  # and nothing of the other generation: Hopper must not fall back to HMMA
        other = {"HGMMA": "HMMA", "HMMA": "HGMMA"}[r["tensor_core_op"]]
        assert not any(name.split(".")[0] == other for name in r["matrix_ops"]), r


def test_fused_linear_kernels_use_tensor_cores(aot_results):
    check_tensor_cores(aot_results)


@pytest.mark.slow
@pytest.mark.skipif(len(SITES) < 2, reason="set CAI_AOT_TRITON_SITE to check another Triton version")
def test_fused_linear_kernels_with_another_triton():
    results = run_aot(SITES[1], "linear_head")
    assert all(r["ok"] for r in results), json.dumps([r for r in results if not r["ok"]], indent=1)[:5000]
    check_tensor_cores(results)
