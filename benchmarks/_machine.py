"""What machine a benchmark run is on, and its two ceilings, measured in the same run.

``machine_info()`` lands in the JSON (pytest-benchmark's ``machine_info``): CPU model, cores, SIMD
flags, torch / triton versions, which C++ build is live, the GPU when there is one. ``slug()`` names
the results file. ``read_bandwidth()`` times a reduction over 512 MB: the floor for any op that must
read its input once (memory-bound ops are reported as a fraction of it).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import time

import torch

BANDWIDTH_BYTES = 512 * 2**20


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    flags = set(_cpuinfo().get("flags", "").split())
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_tile": "amx_tile" in flags}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_info() -> dict:
    """Everything a reader needs to compare two result files."""
    from cai_kernels import _extension, triton as triton_backend

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_backend.installed()[1],
        "cai_kernels_cpu_extension": _extension.status().reason,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device().type,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def slug() -> str:
    """``cpu-amd-epyc-2c`` / ``nvidia-h100-80gb-hbm3``: the machine part of a results file name."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Min wall time of ``fn()`` in seconds (min: the least disturbed run on a shared machine)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def read_bandwidth() -> dict:
    """Bytes/s of ``torch.sum`` over 512 MB of fp32 on the benchmark device (min of repeats)."""
    data = torch.rand(BANDWIDTH_BYTES // 4, device=device())
    seconds = best_time(lambda: data.sum(), repeat=7 if data.is_cuda else 5)
    return {"bytes": BANDWIDTH_BYTES, "seconds": seconds, "gbps": BANDWIDTH_BYTES / seconds / 1e9,
            "how": "torch.sum over 512 MB fp32, min of repeats"}
