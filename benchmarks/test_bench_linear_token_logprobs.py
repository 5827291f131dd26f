"""linear_token_logprobs (the LM head fused with per-token log-probs) against the reference (full
logits, then log_softmax + gather), torch.compile of it, the plain matmul of the same shape (the
ceiling: the op must at least do this matmul), and on GPU Liger-Kernel's fused linear cross-entropy
and Apple's Cut Cross-Entropy.

hidden (tokens, H) ~ N(0, 1), weight (V, H) ~ N(0, 1/H) (logits ~ N(0, 1)), uniform targets.
fwd: the log-probs; fwd+bwd: then ``.sum().backward()`` into hidden and weight. FLOPs: 2·N·H·V for
the forward, 3x that with the backward (the fused kernels recompute the logits in the backward: they
do 4x; TFLOP/s counts the minimal 3x so the numbers compare with the matmul's). "% of matmul": the
variant's TFLOP/s over the plain matmul's (fwd: ``hidden @ weight.T``; fwd+bwd: that and its two
gradient matmuls), measured in the same run.
"""

from __future__ import annotations

import pytest
import torch

import cai_kernels
from cai_kernels import reference

from . import peers
from ._harness import Step, Variant, backend_of, best_rate, compile_fn, dtype_name, measure, ours, step_for
from ._machine import device

OP = "linear_token_logprobs"
F32, BF16 = torch.float32, torch.bfloat16
_SCALE = 8 if torch.cuda.is_available() else 1
SMOLLM = dict(hidden=576, vocab=49152)  # SmolLM2-135M's head (the embedded model)
CASES = (
    [dict(tokens=t * _SCALE, **SMOLLM, dtype=F32, mode="fwd+bwd") for t in (1024, 2048)]
    + [dict(tokens=2048 * _SCALE, **SMOLLM, dtype=F32, mode="fwd")]
    # bf16 on GPU only: a CPU without AVX-512-BF16 runs torch's bf16 GEMMs on a slow path (the eager,
    # compiled and plain-matmul variants of one case took over 10 minutes on the 2-core AVX2 machine);
    # Qwen2.5-0.5B's head (H 896, V 151936) is 0.4 TFLOP per fwd+bwd at 1024 tokens, minutes on 2 cores
    + ([dict(tokens=2048 * _SCALE, **SMOLLM, dtype=BF16, mode="fwd+bwd"),
        dict(tokens=1024 * _SCALE, hidden=896, vocab=151936, dtype=BF16, mode="fwd+bwd")] if _SCALE > 1 else [])
)
QUICK = [dict(tokens=2048 * _SCALE, **SMOLLM, dtype=F32, mode="fwd+bwd")]
MEMORY_CASES = [c for c in CASES if c["dtype"] == F32]

_compiled = compile_fn(reference.linear_token_logprobs)
MATMUL = "matmul only (hidden @ weight.T)"


def variants() -> list[Variant]:
    return [*ours(OP), Variant("reference", "reference"), Variant("reference+torch.compile", "compiled"),
            Variant("liger_kernel.fused_linear_cross_entropy", "peer", peers.liger_fused_linear_cross_entropy()[1]),
            Variant("cut_cross_entropy.linear_cross_entropy", "peer", peers.cut_cross_entropy()[1]),
            Variant(MATMUL, "baseline")]


def implementation(variant: str):
    if variant.startswith("cai_kernels["):
        backend = backend_of(variant)
        return lambda h, w, t: cai_kernels.linear_token_logprobs(h, w, t, backend=backend)
    if variant == "reference":
        return reference.linear_token_logprobs
    if variant == "reference+torch.compile":
        return _compiled
    if variant == MATMUL:
        return lambda h, w, t: h @ w.T
    fn, why = {"liger_kernel.fused_linear_cross_entropy": peers.liger_fused_linear_cross_entropy,
               "cut_cross_entropy.linear_cross_entropy": peers.cut_cross_entropy}[variant]()
    if fn is None:
        raise RuntimeError(why)
    return fn


def build_step(variant: str, *, tokens: int, hidden: int, vocab: int, dtype: torch.dtype, mode: str) -> Step:
    g = torch.Generator(device=device()).manual_seed(tokens + hidden + vocab)
    h = torch.randn(tokens, hidden, generator=g, device=device()).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device()) / hidden ** 0.5).to(dtype)
    t = torch.randint(0, vocab, (tokens,), generator=g, device=device())
    fn = implementation(variant)
    return step_for(mode, lambda: fn(h, w, t), (h, w), flops=2 * tokens * hidden * vocab)


def matmul_rate(case: dict) -> float:
    """FLOP/s of the plain matmul (and its backward) of this shape, measured once in this run."""
    key = ("matmul",) + tuple(sorted((k, str(v)) for k, v in case.items()))
    step = build_step(MATMUL, **case)
    return best_rate(key, step, step.flops)


def _label(c: dict) -> str:
    return f"{c['mode']} [{c['tokens']}, {c['hidden']}]x[{c['vocab']}, {c['hidden']}] {dtype_name(c['dtype'])}"


def _params():
    for case in CASES:
        marks = [pytest.mark.quick] if case in QUICK else []
        yield pytest.param(case, marks=marks, id=_label(case).replace(" ", "-"))


@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
@pytest.mark.parametrize("case", list(_params()))
def test_linear_token_logprobs(benchmark, request, variant, case):
    rate = matmul_rate(case) if not variant.unavailable else None
    measure(benchmark, request, module=__name__, op=OP, variant=variant, case=case, mode=case["mode"],
            x_name="tokens", x_value=case["tokens"], group=f"{OP} {_label(case)}", baseline_flops_per_s=rate)
