"""choice_logprobs: every compiled backend against the float64 reference and a naive per-option scorer.; bad input."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import choice_logprobs as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = compiled_backends("choice_logprobs", DEVICE)
CAI_CLAMP = (0.4, 0.6)  # what CAI applies to chain-of-thought labels


def make_questions(option_counts, vocab, *, max_tokens=4, shuffle=True):
    """targets (N,), option_ids (N,), num_options (Q,): each option 1..max_tokens tokens; shuffled so
    that an option's tokens are not contiguous."""
    num_options = torch.tensor(option_counts, dtype=torch.long)
    lengths = torch.randint(1, max_tokens + 1, (int(num_options.sum()),))
    option_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    if shuffle:
        option_ids = option_ids[torch.randperm(len(option_ids))]
    targets = torch.randint(0, vocab, option_ids.shape)
    return targets.to(DEVICE), option_ids.to(DEVICE), num_options.to(DEVICE)


def make_source(source, num_tokens, vocab, dtype=torch.float64, hidden_size=12):
    """The scores' inputs as keyword arguments: logits (N, V), or hidden (N, H) + weight (V, H) + bias (V,)."""
    if source == "logits":
        return {"logits": (torch.randn(num_tokens, vocab, dtype=torch.float64) * 2).to(dtype).to(DEVICE)}
    hidden = torch.randn(num_tokens, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * (2 / math.sqrt(hidden_size))
    bias = torch.randn(vocab, dtype=torch.float64)
    return {k: v.to(dtype).to(DEVICE) for k, v in (("hidden", hidden), ("weight", weight), ("bias", bias))}


def as_float64(source):
    return {k: v.detach().double() for k, v in source.items()}


def naive_scores(targets, option_ids, num_options, source, *, temperature=1.0, clamp=None):
    """One option at a time, in float64: the plain definition, with nothing shared between options."""
    if "logits" in source:
        logits = source["logits"].double()
    else:
        logits = torch.nn.functional.linear(source["hidden"].double(), source["weight"].double(),
                                            source["bias"].double())
    rows = []
    option = 0
    for count in num_options.tolist():
        sums = []
        for _ in range(count):
            positions = (option_ids == option).nonzero().squeeze(1)
            token_logp = (logits[positions] / temperature).log_softmax(-1).gather(-1, targets[positions, None])
            sums.append(token_logp.sum())
            option += 1
        sums = torch.stack(sums)
        probs = sums.softmax(0)
        rows.append((sums, probs if clamp is None else probs.clamp(*clamp)))
    return rows


def check_against_naive(result, rows):
    option_logprobs, probs = result
    max_options = max(len(s) for s, _ in rows)
    assert option_logprobs.shape == probs.shape == (len(rows), max_options)
    for q, (sums, expected_probs) in enumerate(rows):
        n = len(sums)
        assert_close(option_logprobs[q, :n], sums, rtol=1e-5, atol=1e-5, msg=f"option log-probs of question {q}")
        assert_close(probs[q, :n], expected_probs, rtol=1e-5, atol=1e-6, msg=f"probabilities of question {q}")
        assert torch.all(option_logprobs[q, n:] == -math.inf) and torch.all(probs[q, n:] == 0), "padding"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
@pytest.mark.parametrize("clamp", [None, CAI_CLAMP], ids=["no_clamp", "clamp"])
def test_matches_naive_per_option_scorer(backend, source, clamp):
    # 2-option and 9-option questions mixed (the HHH eval's A/B, a 9-way principle choice), 1..4 tokens each
    targets, option_ids, num_options = make_questions([2, 9, 2, 3, 9, 1], vocab=97)
    inputs = make_source(source, len(targets), 97, dtype=torch.float32)
    result = cai_kernels.choice_logprobs(targets, option_ids, num_options, temperature=0.8, clamp=clamp,
                                         backend=backend, **inputs)
    assert all(t.dtype == torch.float32 for t in result)
    check_against_naive(result, naive_scores(targets, option_ids, num_options, inputs, temperature=0.8, clamp=clamp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_matches_reference_in_every_dtype(backend, dtype, source):
    targets, option_ids, num_options = make_questions([9, 2, 4], vocab=61)
    inputs = make_source(source, len(targets), 61, dtype=dtype)
    option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, num_options, clamp=(0.05, 0.9),
                                                         backend=backend, **inputs)
    ref_logprobs, ref_probs = reference(targets, option_ids, num_options, clamp=(0.05, 0.9), **as_float64(inputs))
    assert option_logprobs.dtype == probs.dtype == torch.float32
    assert_close(option_logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_gradients_match_reference(backend, source):
    targets, option_ids, num_options = make_questions([2, 9, 2, 5], vocab=40)
    inputs = make_source(source, len(targets), 40, dtype=torch.float32)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    option_weights = torch.rand(4, 9, dtype=torch.float64, device=DEVICE)

    def loss(result):
        option_logprobs, probs = result
        finite = option_logprobs.isfinite()
        return ((probs * option_weights.to(probs.dtype)).sum()
                + 0.1 * (option_logprobs.where(finite, 0) * option_weights.to(probs.dtype)).sum())

    loss(cai_kernels.choice_logprobs(targets, option_ids, num_options, clamp=(0.02, 0.7), backend=backend,
                                     **leaves)).backward()
    loss(reference(targets, option_ids, num_options, clamp=(0.02, 0.7), **ref_leaves)).backward()
    for name in inputs:
        assert leaves[name].grad.dtype == torch.float32
        scale = ref_leaves[name].grad.abs().max().item()
        assert_close(leaves[name].grad, ref_leaves[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_gradcheck_float64(backend, source):
    targets, option_ids, num_options = make_questions([2, 3], vocab=7, max_tokens=2)
    inputs = make_source(source, len(targets), 7, hidden_size=3)
    names = list(inputs)
    leaves = tuple(inputs[k].requires_grad_() for k in names)

    def scores(*tensors):
        kwargs = dict(zip(names, tensors))
        option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, num_options, temperature=0.9,
                                                             clamp=(0.1, 0.8), backend=backend, **kwargs)
        return option_logprobs.where(option_logprobs.isfinite(), 0), probs

    assert torch.autograd.gradcheck(scores, leaves, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_blocks_gradient_where_it_bites(backend):
    # question 0: p = (0.88, 0.12) is clamped to (0.6, 0.4): no gradient flows from its probabilities
    logits = torch.zeros(4, 3, device=DEVICE)
    logits[0, 0], logits[1, 1] = 2.0, 0.0
    logits = logits.requires_grad_()
    targets = torch.tensor([0, 0, 1, 2], device=DEVICE)
    option_ids = torch.tensor([0, 1, 2, 3], device=DEVICE)
    _, probs = cai_kernels.choice_logprobs(targets, option_ids, torch.tensor([2, 2], device=DEVICE), logits=logits,
                                           clamp=CAI_CLAMP, backend=backend)
    assert_close(probs[0], torch.tensor([0.6, 0.4]))
    probs.sum().backward()
    assert torch.all(logits.grad[:2] == 0) and torch.all(logits.grad[2:] == 0)  # q1 sums to 1: no gradient either
    assert_close(probs[1], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_option_with_impossible_token(backend):
    logits = torch.randn(5, 10, device=DEVICE)
    logits[2, 4] = -math.inf                      # option 1's second token can never be produced
    targets = torch.tensor([1, 2, 4, 3, 7], device=DEVICE)
    option_ids = torch.tensor([0, 1, 1, 2, 2], device=DEVICE)
    option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, torch.tensor([3], device=DEVICE),
                                                         logits=logits, backend=backend)
    assert option_logprobs[0, 1] == -math.inf and probs[0, 1] == 0
    assert_close(probs[0, [0, 2]].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_option_and_tokens_in_order(backend):
    targets, option_ids, num_options = make_questions([1, 1, 2], vocab=20, shuffle=False)
    inputs = make_source("logits", len(targets), 20, dtype=torch.float32)
    option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, num_options, clamp=(0.0, 0.95),
                                                         backend=backend, **inputs)
    assert probs[0, 0] == 0.95 and probs[1, 0] == 0.95 and probs[0, 1] == 0 and probs[1, 1] == 0
    check_against_naive((option_logprobs, probs),
                        naive_scores(targets, option_ids, num_options, inputs, clamp=(0.0, 0.95)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_questions(backend):
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    option_logprobs, probs = cai_kernels.choice_logprobs(empty, empty, empty, logits=torch.empty(0, 5, device=DEVICE),
                                                         backend=backend)
    assert option_logprobs.shape == probs.shape == (0, 0)


@settings(max_examples=20, deadline=None)
@given(
    option_counts=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    max_tokens=st.integers(1, 4),
    source=st.sampled_from(["logits", "hidden"]),
    temperature=st.floats(0.2, 3.0),
    clamp=st.one_of(st.none(), st.tuples(st.floats(0.0, 0.5), st.floats(0.5, 1.0))),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(option_counts, max_tokens, source, temperature, clamp, backend):
    targets, option_ids, num_options = make_questions(option_counts, vocab=33, max_tokens=max_tokens)
    inputs = make_source(source, len(targets), 33, dtype=torch.float32)
    option_logprobs, probs = cai_kernels.choice_logprobs(targets, option_ids, num_options, temperature=temperature,
                                                         clamp=clamp, backend=backend, **inputs)
    ref_logprobs, ref_probs = reference(targets, option_ids, num_options, temperature=temperature, clamp=clamp,
                                        **as_float64(inputs))
    tol = 2e-5 * (1 + 4 / temperature)
    assert_close(option_logprobs, ref_logprobs, rtol=tol, atol=tol)
    assert_close(probs, ref_probs, rtol=tol, atol=tol)


def test_backends_agree_with_each_other():
    targets, option_ids, num_options = make_questions([2, 9, 9, 2], vocab=50)
    inputs = make_source("hidden", len(targets), 50, dtype=torch.bfloat16)
    outs = [cai_kernels.choice_logprobs(targets, option_ids, num_options, clamp=CAI_CLAMP, backend=p.values[0],
                                        **inputs) for p in BACKENDS]
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


@pytest.fixture
def choice():
    """Two questions (2 and 3 options), 7 tokens, logits over 11 classes."""
    targets = torch.randint(0, 11, (7,), device=DEVICE)
    option_ids = torch.tensor([0, 0, 1, 2, 3, 4, 4], device=DEVICE)
    num_options = torch.tensor([2, 3], device=DEVICE)
    return targets, option_ids, num_options, torch.randn(7, 11, device=DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layout_errors(backend, choice):
    targets, option_ids, num_options, logits = choice
    cases = [
        (option_ids.clone().index_fill_(0, torch.tensor([3], device=DEVICE), 5), num_options,
         r"option_ids must lie in \[0, 5\) \(O = num_options.sum\(\)\); got option_ids\[3\] = 5"),
        (option_ids.clone().index_fill_(0, torch.tensor([0], device=DEVICE), -1), num_options,
         r"option_ids must lie in \[0, 5\)"),
        (option_ids.clone().index_fill_(0, torch.tensor([2], device=DEVICE), 0), num_options,
         r"every option must have at least one token; option 1 has none"),
        (option_ids, torch.tensor([2, 4], device=DEVICE), r"every option must have at least one token; option 5"),
        (option_ids, torch.tensor([2, 2], device=DEVICE), r"option_ids must lie in \[0, 4\)"),
        (option_ids, torch.tensor([5, 0], device=DEVICE), r"num_options must be >= 1 for every question; got "
                                                          r"num_options\[1\] = 0"),
    ]
    for ids, counts, message in cases:
        with pytest.raises(ValueError, match=message):
            cai_kernels.choice_logprobs(targets, ids, counts, logits=logits, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_target_out_of_range(backend, choice):
    targets, option_ids, num_options, logits = choice
    targets[4] = 11
    with pytest.raises(ValueError, match=r"targets .*\[0, 11\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, backend=backend)


def test_scores_source(choice):
    targets, option_ids, num_options, logits = choice
    hidden, weight = torch.randn(7, 4, device=DEVICE), torch.randn(11, 4, device=DEVICE)
    with pytest.raises(ValueError, match="pass either logits, or hidden \\+ weight \\(\\+ bias\\), not both"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match="pass either logits"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, bias=torch.zeros(11))
    with pytest.raises(ValueError, match=r"pass logits \(N, V\), or hidden \(N, H\) with weight \(V, H\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options)
    with pytest.raises(ValueError, match="got hidden=a tensor, weight=None"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden)
    with pytest.raises(ValueError, match=r"hidden must have 2 dimensions \(N, H\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden[None], weight=weight)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits[None])
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits[:6])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, hidden=hidden, weight=weight.double())


def test_index_tensors(choice):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(TypeError, match="option_ids must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets, option_ids.int(), num_options, logits=logits)
    with pytest.raises(TypeError, match="num_options must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options.float(), logits=logits)
    with pytest.raises(TypeError, match="targets must have dtype in \\(torch.int64\\)"):
        cai_kernels.choice_logprobs(targets.int(), option_ids, num_options, logits=logits)
    with pytest.raises(ValueError, match=r"option_ids must have shape \(7,\)"):
        cai_kernels.choice_logprobs(targets, option_ids[:6], num_options, logits=logits)
    with pytest.raises(ValueError, match="num_options must have 1 dimensions"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options[None], logits=logits)
    with pytest.raises(ValueError, match="targets must have 1 dimensions"):
        cai_kernels.choice_logprobs(targets[None], option_ids, num_options, logits=logits)
    with pytest.raises(ValueError, match="num_options must be on the same device as targets"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options.to("meta"), logits=logits)


@pytest.mark.parametrize("clamp,error,message", [
    ((0.6, 0.4), ValueError, r"clamp must satisfy 0 <= lo <= hi <= 1; got \(0.6, 0.4\)"),
    ((-0.1, 0.5), ValueError, "clamp must satisfy"),
    ((0.5, 1.5), ValueError, "clamp must satisfy"),
    ((math.nan, 0.5), ValueError, "clamp must satisfy"),
    ((0.4,), TypeError, r"clamp must be None or a pair \(lo, hi\) of numbers"),
    ("ab", TypeError, "clamp must be None or a pair"),
    (0.5, TypeError, "clamp must be None or a pair"),
    ((0.4, "0.6"), TypeError, "clamp must be None or a pair"),
])
def test_clamp(choice, clamp, error, message):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(error, match=message):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, clamp=clamp)


def test_temperature(choice):
    targets, option_ids, num_options, logits = choice
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cai_kernels.choice_logprobs(targets, option_ids, num_options, logits=logits, temperature=-1.0)
