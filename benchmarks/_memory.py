"""Peak extra host memory of one call, measured in a fresh interpreter per variant.

``peak_extra_bytes("module:factory", **kwargs)`` starts a new Python process that
  1. calls ``factory(**kwargs)``, which allocates the inputs and returns a zero-argument callable
     (the step to measure, e.g. forward + backward);
  2. runs the step once (warm-up: imports, thread pools, BLAS buffers, the gradient tensors);
  3. resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5), reads VmRSS,
     runs the step again and reads VmHWM.
The result is VmHWM - VmRSS: how far the step pushed resident memory above what was live before it.
A step that sets ``.grad = None`` first replaces the previous gradients with new ones of the same
size, so that number is the memory *beyond* the gradient tensors themselves.

glibc's malloc is pinned to mmap every block above 128 KB (``MALLOC_MMAP_THRESHOLD_``): a freed
block then goes back to the OS at once, instead of being kept on a free list that a later
allocation would reuse without raising the RSS, which would hide part of the peak.

Linux only (``/proc``). Used by the benchmark suite and by tests that bound memory growth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import gc, importlib, json, re, sys

def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024

module, name = sys.argv[1].split(":")
factory = getattr(importlib.import_module(module), name)
for kwargs in json.loads(sys.argv[2]):
    step = factory(**kwargs)
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    step()
    peak = status("VmHWM")
    print(json.dumps({"rss_before": before, "peak": peak}), flush=True)
    del step  # frees this case's inputs before the next one is built
    gc.collect()
"""

@dataclass(frozen=True)
class PeakMemory:
    rss_before: int  # bytes resident before the measured step (inputs, previous gradients, libraries)
    peak: int        # the high-water mark during the step

    @property
    def extra(self) -> int:
        return self.peak - self.rss_before


def peak_extra_bytes(factory: str, *, threads: int | None = None, timeout: float = 600, **kwargs) -> PeakMemory:
    """Measure one step built by ``factory`` ("package.module:function") in a fresh process."""
    return peak_extra_bytes_each(factory, [kwargs], threads=threads, timeout=timeout)[0]


def peak_extra_bytes_each(factory: str, kwargs_list: list[dict], *, threads: int | None = None,
                          timeout: float = 600) -> list[PeakMemory]:
    """Measure several steps, one after the other, in one fresh process (one interpreter start and
    one import of torch for all of them). Each step's inputs are freed before the next is built, and
    the high-water mark is reset before each measured call, so each result is that step's alone."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    run = subprocess.run([sys.executable, "-c", _CHILD, factory, json.dumps(kwargs_list)], capture_output=True,
                         text=True, env=env, cwd=_REPO_ROOT, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"measuring {factory}({kwargs_list}) failed:\n{run.stderr[-3000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    return [PeakMemory(**json.loads(line)) for line in lines[-len(kwargs_list):]]
