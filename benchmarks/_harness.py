"""The shared machinery of every benchmark: variants, one timed case, efficiency and memory in extra_info.

A benchmark module (``test_bench_<op>.py``) defines
  * ``variants()``: the implementations to compare, each a :class:`Variant`;
  * ``build_step(variant, **case)``: allocates the inputs of one case (shape, dtype, mode) and returns a
    :class:`Step` (the call to time, and what it moves / computes);
and its tests call :func:`measure`. The memory of a variant is measured by re-running the same
``build_step`` in a fresh process (``benchmarks/_memory.py``), so time and memory are of the same code.

Timing: the first call (compilation, thread-pool start, lazy imports) is excluded; then
pytest-benchmark's ``pedantic`` runs ``rounds`` calls, enough for about ``TIME_BUDGET_S`` seconds.
The report uses each variant's *min* time: on a shared 2-core machine the least disturbed run is the
closest to the code's own cost.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from . import _machine

TIME_BUDGET_S = float(os.environ.get("CAI_BENCH_TIME_BUDGET", "0.6"))
MIN_ROUNDS = 3
MAX_ROUNDS = 200 if torch.cuda.is_available() else 30  # a GPU call is ~1 ms: more rounds cost little

# One torch.compile per (function, shape): the default of 8 recompiles per code object would
# silently fall back to eager on the 9th shape of a sweep.
torch._dynamo.config.cache_size_limit = 256
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 256
if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
    torch._dynamo.config.accumulated_recompile_limit = 4096

KINDS = ("ours", "reference", "compiled", "peer", "baseline")


@dataclass(frozen=True)
class Variant:
    """One implementation in a comparison.

    kind: "ours" (a cai_kernels backend), "reference" (cai_kernels.reference, eager), "compiled"
    (torch.compile of the reference), "peer" (what users would pick instead), "baseline" (a ceiling,
    e.g. the plain matmul of the same shape). ``unavailable`` is the reason it cannot run here, or None.
    """

    name: str
    kind: str
    unavailable: str | None = None


@dataclass
class Step:
    """The call to time on one set of inputs.

    fn: the timed call. setup: untimed, before every call (e.g. drop the previous gradients).
    bytes: the fewest bytes the step must move (each input read once, each output written once per
    pass); flops: its arithmetic (matmul-bound ops). Either may be None.
    """

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    bytes: int | None = None
    flops: int | None = None
    info: dict = field(default_factory=dict)

    def __call__(self):
        if self.setup is not None:
            self.setup()
        return self.fn()


def compile_fn(fn):
    """torch.compile as users apply it to the reference: default mode, static shapes (the strongest)."""
    return torch.compile(fn, dynamic=False)


@functools.cache
def live_backends(op: str) -> list[str]:
    """The compiled backends of ``op`` that run on this machine's benchmark device (Triton on CPU only
    through its interpreter, which is no benchmark: the suite's conftest turns it off)."""
    from cai_kernels import _registry

    if op not in _registry.OPS:
        return []
    return [b for b, (ok, _) in _registry.status(op, _machine.device().type).items() if ok and b != "reference"]


def ours(op: str) -> list[Variant]:
    """One variant per live compiled backend of ``op``, or one unavailable variant saying why."""
    from cai_kernels import _registry

    if op not in _registry.OPS:
        return [Variant("cai_kernels", "ours", f"{op} is not in this checkout of cai_kernels yet")]
    backends = live_backends(op)
    if not backends:
        reasons = "; ".join(f"{b}: {why}" for b, (ok, why) in _registry.status(op, _machine.device().type).items()
                            if b != "reference")
        return [Variant("cai_kernels", "ours", f"no compiled backend of {op} is live here ({reasons})")]
    return [Variant(f"cai_kernels[{b}]", "ours") for b in backends]


def backend_of(variant: str) -> str:
    """``cai_kernels[cpu]`` -> ``cpu``."""
    return variant[variant.index("[") + 1:-1]


def require_op(*names: str) -> None:
    """Skip (at collection of a test) when this checkout lacks one of the ops."""
    import cai_kernels

    missing = [n for n in names if not hasattr(cai_kernels, n)]
    if missing:
        pytest.skip(f"cai_kernels has no {', '.join(missing)} in this checkout (branch not merged)")


def drop_grads(*tensors: torch.Tensor) -> Callable[[], None]:
    """A setup that frees the gradients of the previous round, so every round allocates the same."""
    def setup():
        for t in tensors:
            t.grad = None
    return setup


def _scalar(out) -> torch.Tensor:
    """The first tensor of an op's output, summed: what a training step backpropagates from."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().sum()


def step_for(mode: str, call: Callable[[], Any], grad_inputs: tuple[torch.Tensor, ...] = (), *,
             bytes_fwd: int | None = None, bytes_bwd: int | None = None, flops: int | None = None) -> Step:
    """fwd: ``call()`` with no gradient tracked. fwd+bwd: ``call()``, then backward of its first output's
    sum into ``grad_inputs`` (their gradients dropped before every round). Bytes: ``bytes_fwd`` for a
    forward, plus ``bytes_bwd`` for the backward."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return call()
        return Step(forward, bytes=bytes_fwd, flops=flops)
    for t in grad_inputs:
        t.requires_grad_(True)
    total = bytes_fwd + bytes_bwd if bytes_fwd is not None and bytes_bwd is not None else None
    return Step(lambda: _scalar(call()).backward(), setup=drop_grads(*grad_inputs), bytes=total,
                flops=None if flops is None else 3 * flops)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rounds(call_s: float) -> int:
    """Enough rounds for about TIME_BUDGET_S, at least 3; a warm call slower than the budget (a
    Python-loop peer) gets 2: its min is still meaningful against variants 10x faster."""
    if call_s > TIME_BUDGET_S:
        return 2
    return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TIME_BUDGET_S / max(call_s, 1e-6))))


def measure(benchmark, request, *, module: str, op: str, variant: Variant, case: dict, mode: str,
            x_name: str, x_value: int, group: str, baseline_flops_per_s: float | None = None) -> None:
    """Time ``build_step(variant.name, **case)`` of ``module``, record efficiency and memory.

    ``x_name``/``x_value`` are the plot axis (tokens, or B*T for PPO ops). Peak extra memory is measured
    on GPU always (cheap), on CPU for the module's ``MEMORY_CASES`` (a fresh process per variant).
    ``baseline_flops_per_s``: for matmul-bound ops, the plain matmul's rate of the same shape.
    """
    if variant.unavailable:
        pytest.skip(f"{variant.name}: {variant.unavailable}")
    benchmark.group = group
    bench_module = importlib.import_module(module)
    start = time.perf_counter()
    try:
        built = bench_module.build_step(variant.name, **case)
        start = time.perf_counter()
        built()  # warm-up: compiles, starts thread pools, allocates the gradients once
        _machine.synchronize()
    except Exception as error:  # a peer that cannot import or take these inputs is a skip, not a failure
        if variant.kind != "peer":
            raise
        pytest.skip(f"{variant.name} failed here: {type(error).__name__}: {str(error)[:200]}")
    first = time.perf_counter() - start
    steady = first
    if first > TIME_BUDGET_S:  # the warm-up may have been a compile (Triton, torch.compile): time a warm call
        start = time.perf_counter()
        built()
        _machine.synchronize()
        steady = time.perf_counter() - start
    if torch.cuda.is_available():
        benchmark.pedantic(lambda: (built.fn(), torch.cuda.synchronize()), setup=built.setup,
                           rounds=_rounds(steady), iterations=1)
    else:
        benchmark.pedantic(built.fn, setup=built.setup, rounds=_rounds(steady), iterations=1)
    seconds = benchmark.stats.stats.min

    info = benchmark.extra_info
    info.update(op=op, variant=variant.name, kind=variant.kind, mode=mode, x_name=x_name, x=x_value,
                case={k: (dtype_name(v) if isinstance(v, torch.dtype) else v) for k, v in case.items()},
                first_call_s=first, **built.info)
    if built.bytes:
        bandwidth = _machine.read_bandwidth()
        info.update(bytes=built.bytes, gbps=built.bytes / seconds / 1e9,
                    bw_fraction=built.bytes / seconds / 1e9 / bandwidth["gbps"], read_gbps=bandwidth["gbps"])
    if built.flops:
        info.update(flops=built.flops, tflops=built.flops / seconds / 1e12)
        if baseline_flops_per_s:
            info.update(matmul_tflops=baseline_flops_per_s / 1e12,
                        matmul_fraction=built.flops / seconds / baseline_flops_per_s)
    del built

    if torch.cuda.is_available():
        info.update(_cuda_peak(module, variant.name, case))
    elif encode_case(case) in [encode_case(c) for c in getattr(bench_module, "MEMORY_CASES", [])] \
            and request.config.getoption("bench_memory"):
        peak = cpu_peak(module, variant.name, case, batch=not quick_run(request.config))
        info.update(peak_extra_mb=peak.extra / 2**20, rss_before_mb=peak.rss_before / 2**20,
                    memory_how="peak RSS delta of the 2nd call, in a fresh process per variant")


def quick_run(config) -> bool:
    """True under ``-m quick`` (make bench-quick)."""
    return "quick" in (config.getoption("markexpr") or "")


def cpu_peak(module: str, variant: str, case: dict, *, batch: bool = True):
    """Peak extra RSS of ``variant`` on ``case``. With ``batch``, the first request for a variant of a
    module measures all of that module's ``MEMORY_CASES`` in one fresh process (one torch import and
    one start per variant, not per case)."""
    from . import _memory

    key = (module, variant)
    _PEAKS.setdefault(key, {})
    if batch and not _PEAKS[key]:
        # a variant may exist for one op of the module only (the GAE loop, a peer): batch that op's cases
        cases = [encode_case(c) for c in importlib.import_module(module).MEMORY_CASES if c.get("op") == case.get("op")]
        if encode_case(case) not in cases:
            cases.append(encode_case(case))
        peaks = _memory.peak_extra_bytes_each("benchmarks._harness:memory_step",
                                              [{"module": module, "variant": variant, "case": c} for c in cases])
        _PEAKS[key].update({json.dumps(c, sort_keys=True): p for c, p in zip(cases, peaks)})
    found = _PEAKS[key].get(json.dumps(encode_case(case), sort_keys=True))
    if found is None:  # a case outside MEMORY_CASES: measure it alone
        found = _memory.peak_extra_bytes("benchmarks._harness:memory_step", module=module, variant=variant,
                                         case=encode_case(case))
        _PEAKS[key][json.dumps(encode_case(case), sort_keys=True)] = found
    return found


_PEAKS: dict[tuple, dict] = {}


def _cuda_peak(module: str, variant: str, case: dict) -> dict:
    built = importlib.import_module(module).build_step(variant, **case)
    built()
    torch.cuda.synchronize()
    if built.setup is not None:
        built.setup()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    built.fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return {"peak_extra_mb": extra / 2**20, "memory_how": "torch.cuda.max_memory_allocated delta of the 2nd call"}


def encode_case(case: dict) -> dict:
    """JSON-able case (dtypes by name) for the memory subprocess."""
    return {k: ({"dtype": dtype_name(v)} if isinstance(v, torch.dtype) else v) for k, v in case.items()}


def decode_case(case: dict) -> dict:
    return {k: (getattr(torch, v["dtype"]) if isinstance(v, dict) and "dtype" in v else v) for k, v in case.items()}


def memory_step(module: str, variant: str, case: dict):
    """Factory for ``_memory.peak_extra_bytes``: the same step the timed benchmark ran."""
    return importlib.import_module(module).build_step(variant, **decode_case(case))


def best_rate(key: tuple, fn: Callable[[], Any], work: float) -> float:
    """``work`` per second of ``fn`` (min time of repeats), measured once per key in this run."""
    if key not in _RATES:
        _RATES[key] = work / _machine.best_time(fn, repeat=2)
    return _RATES[key]


_RATES: dict[tuple, float] = {}
