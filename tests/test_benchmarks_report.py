"""The benchmark suite's tooling: the report (ratios, claims, plots, README section), the memory
probe and the GPU script's dry run. The benchmarks themselves run with `make bench`, not here."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(variant, kind, seconds, *, tokens=4096, mode="fwd", dtype="float32", **info):
    case = {"tokens": tokens, "vocab": 49152, "dtype": dtype, "mode": mode}
    return {"group": f"token_logprobs {mode} [{tokens}, 49152] {dtype}", "name": f"test[{variant}]",
            "stats": {"min": seconds, "median": seconds * 1.1, "rounds": 3},
            "extra_info": {"op": "token_logprobs", "variant": variant, "kind": kind, "mode": mode, "x_name": "tokens",
                           "x": tokens, "case": case, **info}}


@pytest.fixture
def results(tmp_path):
    benches = []
    for tokens, scale in ((1024, 0.25), (4096, 1.0)):
        benches += [_bench("cai_kernels[cpu]", "ours", 0.030 * scale, tokens=tokens, gbps=27.0, bw_fraction=0.8,
                           peak_extra_mb=0.1),
                    _bench("reference", "reference", 0.250 * scale, tokens=tokens, peak_extra_mb=1536.0),
                    _bench("reference+torch.compile", "compiled", 0.071 * scale, tokens=tokens, peak_extra_mb=0.2),
                    _bench("trl.selective_log_softmax", "peer", 0.5 * scale, tokens=tokens)]
    data = {"machine_info": {"cpu_model": "Test CPU", "cpu_cores": 2, "cpu_flags": {"avx2": True, "avx512f": False},
                             "device": "cpu", "date": "2026-01-01", "read_bandwidth": {"gbps": 33.0, "how": "sum"}},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benches,
            "skipped": [{"test": "benchmarks/x.py::t[liger]", "reason": "liger: CUDA only"}]}
    path = tmp_path / "cpu-test-2026-01-01.json"
    path.write_text(json.dumps(data))
    return path


def test_report_tables_claims_plots_and_readme(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\n## Benchmarks\n\nintro\n\n## License\n\nApache\n")
    assert report.main([str(results), "--readme", str(readme)]) == 0
    md = (tmp_path / "cpu-test-2026-01-01.md").read_text()
    # speed-ups are t(reference) / t(variant): 0.25 / 0.03 = 8.3x, 0.071 / 0.03 = 2.37x
    assert "| **cai_kernels[cpu]** | 30 | 33 | 8.33x | 2.37x | 27.0 | 80 | 0.1 |" in md
    assert "| token_logprobs fwd [4096, 49152] fp32 >= 2x torch.compile | 2.37x | yes |" in md
    assert "| token_logprobs fwd [4096, 49152] fp32 >= 6x eager | 8.33x | yes |" in md
    assert "| token_logprobs fwd [4096, 49152] fp32 >= 65 % of read bandwidth | 80 % | yes |" in md
    assert "gae [256, 1024] >= 50x the Python loop (OpenRLHF / veRL) | not measured | n/a" in md
    assert "liger: CUDA only (1 benchmark)" in md
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert any("time-token-logprobs-fwd" in p for p in plots) and any("memory-" in p for p in plots), plots
    text = readme.read_text()
    assert text.index("## Benchmarks") < text.index("<!-- bench:cpu:start -->") < text.index("## License")
    assert "| token_logprobs | fwd [4096, 49152] float32 | 30 | 250 | 71 | 8.33x | 2.37x |" in text
    # a second run replaces the section instead of adding another
    assert report.main([str(results), "--readme", str(readme), "--no-plots"]) == 0
    assert readme.read_text().count("<!-- bench:cpu:start -->") == 1


def test_a_failed_claim_says_no(results):
    data = json.loads(results.read_text())
    for bench in data["benchmarks"]:
        if bench["extra_info"]["kind"] == "compiled":
            bench["stats"]["min"] = bench["stats"]["min"] / 10  # compile 10x faster than measured
    groups = report.by_group(report.rows(data))
    verdicts = {c.text: v for c, _, v in report.evaluate_claims(groups, report.CPU_CLAIMS)}
    assert verdicts["token_logprobs fwd [4096, 49152] fp32 >= 2x torch.compile"] == "**no**"


def test_parts_merge_into_one_run(results, tmp_path):
    merged = tmp_path / "merged.json"
    assert report.main([str(results), str(results), "--merge-into", str(merged), "--no-plots"]) == 0
    data = json.loads(merged.read_text())
    assert len(data["benchmarks"]) == 16 and len(data["skipped"]) == 2


def test_memory_probe_sees_a_known_allocation():
    from benchmarks import _memory

    peak = _memory.peak_extra_bytes("tests.test_benchmarks_report:_allocate_64mb")
    assert 60 * 2**20 < peak.extra < 80 * 2**20, peak


def _allocate_64mb():
    import torch

    return lambda: torch.ones(16 * 2**20).sum()  # 64 MB of fp32, touched, freed after the call


def test_gpu_script_dry_run():
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "all", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OUT": "/tmp/cai-gpu-dry-run", "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for expected in ("setup.py -q build_ext --inplace", "-m pytest tests", "test_bench_token_logprobs.py",
                     "--benchmark-json=benchmarks/results/DEVICE-DATE-logprobs.json",
                     "-m benchmarks.report", "--merge-into benchmarks/results/DEVICE-DATE.json"):
        assert expected in out, (expected, out)


def test_gpu_script_acceptance_dry_run(tmp_path):
    """``gpu.sh acceptance``: the CUDA tests of the changed ops (with their own time limit), the headline benchmarks
    and their ratio table, an avx512-only build; --dry-run writes nothing."""
    out_dir = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "acceptance", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for expected in ("CAI_KERNELS_CAPABILITIES=avx512 ", "timeout -s INT -k 10 110", "tests/test_launches.py",
                     "tests/test_cuda_graphs.py", "tests/test_func_transforms.py", "-m quick --benchmark-only",
                     "--benchmark-json=benchmarks/results/DEVICE-DATE-acceptance.json",
                     "-m benchmarks.report benchmarks/results/DEVICE-DATE-acceptance.json",
                     "-m benchmarks.linear_head_gpu", "-m benchmarks.token_logprobs_gpu", "--rows 4096 8192"):
        assert expected in out, (expected, out)
    assert not any(out_dir.rglob("*")), list(out_dir.rglob("*"))
