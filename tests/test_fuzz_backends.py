"""Every op's backends against the float64 reference on NaN / inf / extreme finite inputs (issue 13).

The contract is the reference evaluated in float64 on the same input values (the math), rounded once to each
result's dtype. Each backend -- the reference itself in the inputs' dtype, cpu, triton (the interpreter here) --
must give, for every forward output and every gradient:
  * NaN exactly where the contract has NaN, and the same infinities where it has infinities (a result that
    rounds past the dtype's range is inf in the contract too);
  * elsewhere |actual - expected| <= atol + rtol |expected|, with rtol 1e-4 for fp32 results (the kernels'
    polynomial exp / log are a few ulp, sums run in another order) and 2e-2 for bf16 gradients (one rounding
    of an fp32 value); atol is the case's floor scaled to its data (``tests/_fuzz_cases.py``: 1e-5 for O(1)
    results, 1e-5 x T x the largest input for GAE sums, ...) for outputs, and 1e-6 x the largest expected
    gradient (bf16: 1e-2 x) for gradients.
Gradients are taken with a random N(0, 1) upstream gradient on every differentiable output (never 0: a zero
upstream gradient is where the kernels and autograd differ on purpose, see csrc/cpu/kl_math.h).

Coverage: 14 ops x 6 input classes (``tests/_fuzz_cases.CLASSES``) x 3 backends, forward and backward,
fp32 and bf16 inputs, bool / int64 / float32 masks; deterministic (derandomized): QUICK_EXAMPLES examples
each in every run, SLOW_EXAMPLES each in the slow-marked run (the Triton interpreter makes an example cost
~0.1-1 s here).
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from cai_kernels import _registry
from tests._fuzz_cases import BUILDERS, CLASSES, Case

QUICK_EXAMPLES = 2
SLOW_EXAMPLES = 6
BACKENDS = ("reference", *(b for b in _registry.BACKENDS if b != "reference"))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the interpreter compares Triton here")


def _run(case: Case, backend: str, *, float64: bool, seed: int):
    """(outputs, gradients of case.diff) of one backend; float64: the contract (inputs cast to fp64)."""
    tensors, leaves = {}, {}
    for name, value in case.tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double() if float64 else value.detach().clone()
            if name in case.diff:
                value.requires_grad_()
                leaves[name] = value
        tensors[name] = value
    backend_name = "reference" if float64 else backend
    with torch.enable_grad():
        outputs = case.call(tensors, backend_name)
    outputs = tuple(outputs)
    grads = {}
    wanted = [outputs[i] for i in case.grad_outputs if outputs[i].requires_grad]
    if wanted and leaves:
        g = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in wanted]
        found = torch.autograd.grad(wanted, list(leaves.values()), upstream, allow_unused=True)
        grads = {name: torch.zeros_like(leaf) if grad is None else grad
                 for (name, leaf), grad in zip(leaves.items(), found)}
    return [o.detach() for o in outputs], grads


def _check(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """``expected`` (float64) rounded to actual's dtype; NaN and infinities must match exactly."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    e = expected.to(actual.dtype).double()
    a = actual.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    bad = nan_a != nan_e
    inf = (a.isinf() | e.isinf()) & ~nan_a & ~nan_e
    bad |= inf & (a != e)
    finite = ~(nan_a | nan_e | inf)
    bad |= finite & ((a - e).abs() > atol + rtol * e.abs())
    if bad.any():
        where = bad.nonzero()[:6].tolist()
        pairs = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.9g} vs {e[tuple(i)].item():.9g}" for i in where)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ (actual vs expected) at {pairs}")


SEEDS = st.integers(0, 2**31 - 1)
DTYPES = st.sampled_from((torch.float32, torch.float32, torch.bfloat16))


def _fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("op", sorted(BUILDERS))
@_fuzz_settings(QUICK_EXAMPLES)
@given(seed=SEEDS, dtype=DTYPES)
def test_backends_follow_the_float64_reference(op, cls, seed, dtype):
    check_backends(op, cls, seed, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("op", sorted(BUILDERS))
@_fuzz_settings(SLOW_EXAMPLES)
@given(seed=SEEDS, dtype=DTYPES)
def test_backends_follow_the_float64_reference_more_examples(op, cls, seed, dtype):
    check_backends(op, cls, seed, dtype)


def check_backends(op: str, cls: str, seed: int, dtype: torch.dtype) -> None:
    """Every backend's outputs and gradients of one built case against the float64 contract."""
    case = BUILDERS[op](torch.Generator().manual_seed(seed), cls, dtype)
    expected_out, expected_grads = _run(case, "reference", float64=True, seed=seed)
    atols = case.atol if isinstance(case.atol, tuple) else (case.atol,) * len(expected_out)
    for backend in BACKENDS:
        where = f"{op} [{cls}, {dtype}, {case.note}] seed={seed} backend={backend}"
        outputs, grads = _run(case, backend, float64=False, seed=seed)
        assert len(outputs) == len(expected_out), where
        for i, (actual, expected) in enumerate(zip(outputs, expected_out)):
            _check(actual, expected, rtol=1e-4, atol=atols[i], what=f"{where}: output {i}")
        for name, expected in expected_grads.items():
            low = grads[name].dtype in (torch.bfloat16, torch.float16)
            finite = expected[torch.isfinite(expected)]
            scale = finite.abs().max().item() if finite.numel() else 0.0
            _check(grads[name], expected, rtol=2e-2 if low else 1e-4, atol=(1e-2 if low else 1e-6) * scale + 1e-30,
                   what=f"{where}: gradient of {name}")
