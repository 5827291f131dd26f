"""Benchmark suite setup (pytest-benchmark). `make bench` runs it; `-m quick` is the short subset.

Adds to the JSON: the machine (CPU model, cores, SIMD flags, versions, the GPU), the read bandwidth
measured in this run, and the benchmarks that were skipped with their reasons.
"""

import os

import torch

if not torch.cuda.is_available():
    # The Triton interpreter runs kernels on CPU tensors for the tests; it is no benchmark.
    os.environ["TRITON_INTERPRET"] = "0"

from . import _machine  # noqa: E402

_SKIPPED: list[dict] = []
_LOAD_AT_START = os.getloadavg()


def pytest_addoption(parser):
    group = parser.getgroup("cai-kernels benchmarks")
    group.addoption("--no-memory", dest="bench_memory", action="store_false", default=True,
                    help="skip the peak-memory measurements (on CPU: one fresh process per measurement)")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the short subset run by `make bench-quick`")


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(_machine.machine_info())
    machine_info["read_bandwidth"] = _machine.read_bandwidth()
    machine_info["slug"] = _machine.slug()
    machine_info["load_average_start"] = _LOAD_AT_START


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = _SKIPPED
    output_json["suite"] = {"quick_only": "quick" in (config.getoption("markexpr") or ""),
                            "memory": config.getoption("bench_memory")}
