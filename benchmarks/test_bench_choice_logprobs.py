"""choice_logprobs (multiple-choice scores: per-option summed token log-probs, softmax per question)
against the reference and torch.compile of it, on the scorer's two input forms:
  * hidden (N, H) + the LM head (V, H): the head applied at option tokens only (cai.scoring's path);
  * logits (N, V) at the positions that predict each option token.
Shapes: the HHH eval (438 questions, 2 options of 3 tokens: " (A)" is ["Ġ(", "A", ")"] for SmolLM2)
and longer free-text options (64 questions x 4 options x 16 tokens). Inference only (fwd).
"""

from __future__ import annotations

import pytest
import torch

import cai_kernels
from cai_kernels import reference

from ._harness import Step, Variant, backend_of, compile_fn, measure, ours, require_op, step_for
from ._machine import device

OP = "choice_logprobs"
SMOLLM = dict(hidden=576, vocab=49152)
CASES = [dict(questions=438, options=2, option_tokens=3, form="hidden", **SMOLLM),
         dict(questions=64, options=4, option_tokens=16, form="hidden", **SMOLLM),
         dict(questions=438, options=2, option_tokens=3, form="logits", **SMOLLM)]
QUICK = [CASES[0]]
MEMORY_CASES = [CASES[0], CASES[2]]

_compiled = compile_fn(reference.choice_logprobs) if hasattr(reference, "choice_logprobs") else None


def variants() -> list[Variant]:
    return [*ours(OP), Variant("reference", "reference"), Variant("reference+torch.compile", "compiled")]


def build_step(variant: str, *, questions: int, options: int, option_tokens: int, form: str, hidden: int,
               vocab: int) -> Step:
    g = torch.Generator(device=device()).manual_seed(questions * options * option_tokens)
    num_options = torch.full((questions,), options, device=device())
    option_ids = torch.arange(questions * options, device=device()).repeat_interleave(option_tokens)
    n = option_ids.numel()
    targets = torch.randint(0, vocab, (n,), generator=g, device=device())
    if form == "hidden":
        h = torch.randn(n, hidden, generator=g, device=device())
        w = torch.randn(vocab, hidden, generator=g, device=device()) / hidden ** 0.5
        inputs, flops, size = dict(hidden=h, weight=w), 2 * n * hidden * vocab, None
    else:
        logits = torch.randn(n, vocab, generator=g, device=device())
        inputs, flops, size = dict(logits=logits), None, logits.numel() * 4
    if variant.startswith("cai_kernels["):
        backend = backend_of(variant)
        fn = lambda: cai_kernels.choice_logprobs(targets, option_ids, num_options, backend=backend, **inputs)  # noqa: E731
    else:
        impl = reference.choice_logprobs if variant == "reference" else _compiled
        fn = lambda: impl(targets, option_ids, num_options, **inputs)  # noqa: E731
    return step_for("fwd", fn, bytes_fwd=size, flops=flops)


def _label(c: dict) -> str:
    return (f"fwd {c['questions']}q x {c['options']} options x {c['option_tokens']} tokens, from {c['form']} "
            f"(H {c['hidden']}, V {c['vocab']})")


def _params():
    for case in CASES:
        marks = [pytest.mark.quick] if case in QUICK else []
        yield pytest.param(case, marks=marks, id=f"{case['questions']}x{case['options']}x{case['option_tokens']}-"
                                                 f"{case['form']}")


@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name)
@pytest.mark.parametrize("case", list(_params()))
def test_choice_logprobs(benchmark, request, variant, case):
    require_op(OP)
    measure(benchmark, request, module=__name__, op=OP, variant=variant, case=case, mode="fwd", x_name="tokens",
            x_value=case["questions"] * case["options"] * case["option_tokens"], group=f"{OP} {_label(case)}")
