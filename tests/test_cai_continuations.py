"""cai.continuations: the prefix tree, the packed tree-attention forwards, and the scores against one full
forward per request (float64 log-softmax), on a tiny random model."""

from __future__ import annotations

import functools
import random

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from cai.continuations import _attention_mask, greedy_matches, prefix_tree, score_continuations
from cai.models import SharedPrefix, load_model
from cai_helpers import _one_thread, require_ops, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def _ops():
    require_ops("choice_logprobs")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


def _paths(node, before=()):
    """{context index: the tokens on its root-to-node path}; checks the tree's invariants on the way."""
    tokens = before + tuple(node.tokens)
    assert node.start == len(before)
    found = {q: list(tokens) for q in node.contexts}
    for child in node.children:
        assert child.tokens, "only the root may hold no tokens"
        found.update(_paths(child, tokens))
    return found


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), min_size=1, max_size=25), st.booleans())
def test_prefix_tree_holds_every_context_once(contexts, share):
    root = prefix_tree(contexts, share=share)
    assert _paths(root) == dict(enumerate(contexts))

    def nodes(node):
        yield node
        for child in node.children:
            yield from nodes(child)
    all_nodes = list(nodes(root))
    if share:  # a radix tree: siblings differ in their first token, so no token sequence runs twice
        for node in all_nodes:
            firsts = [c.tokens[0] for c in node.children]
            assert len(set(firsts)) == len(firsts)
        distinct_prefixes = {tuple(c[:n]) for c in contexts for n in range(1, len(c) + 1)}
        assert sum(len(n.tokens) for n in all_nodes) == len(distinct_prefixes)


@torch.no_grad()
def _naive(model, context, continuation):
    """log p(continuation | context) and is_greedy from one full forward, float64 log-softmax."""
    ids = torch.tensor([context + continuation[:-1]])
    logp = model(ids).logits[0].double().log_softmax(-1)[len(context) - 1:]
    targets = torch.tensor(continuation)
    return logp[torch.arange(len(continuation)), targets].sum().item(), bool((logp.argmax(-1) == targets).all())


def _requests(seed, vocab, *, questions=12):
    """Contexts with shared prefixes (few-shot-like heads, repeated questions, one context a prefix of
    another), 1 to 4 continuations each of 1 to 6 tokens, some sharing leading tokens."""
    rng = random.Random(seed)
    heads = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))] for _ in range(3)]
    contexts = []
    for _ in range(questions):
        contexts.append(rng.choice(heads) + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))])
    contexts.append(list(contexts[0][:-1]) or [5])  # a prefix of another context
    contexts.append(list(contexts[1]))  # an equal context, its own question
    continuations = []
    for _ in contexts:
        common = [rng.randrange(3, vocab)]
        continuations.append([(common if rng.random() < 0.5 else []) + [rng.randrange(3, vocab) for _ in
                                                                         range(rng.randint(1, 5))]
                              for _ in range(rng.randint(1, 4))])
    return contexts, continuations


@pytest.mark.parametrize("batch_size,max_batch_tokens,pack_tokens,share", [
    (1, None, 256, True), (3, None, 256, True), (None, 40, 256, True), (4, None, 256, False), (None, 1, 256, True),
    (1, None, 1, True), (2, None, 12, False), (3, None, None, True)])
def test_scores_match_one_forward_per_request(tiny, batch_size, max_batch_tokens, pack_tokens, share):
    model, tok = tiny
    contexts, continuations = _requests(0, model.config.vocab_size)
    scores = score_continuations(model, tok.pad_token_id, contexts, continuations, batch_size=batch_size,
                                 max_batch_tokens=max_batch_tokens, pack_tokens=pack_tokens, share_prefixes=share,
                                 greedy=True)
    for q, (context, options) in enumerate(zip(contexts, continuations)):
        naive = [_naive(model, context, c) for c in options]
        assert scores.logprobs[q] == pytest.approx([n[0] for n in naive], abs=1e-4)
        assert scores.greedy[q] == [n[1] for n in naive]
        assert sum(scores.probs[q]) == pytest.approx(1.0, abs=1e-5)


def test_greedy_flags_include_true_ones(tiny):
    """Continuations that are the model's own greedy continuation are flagged, one token off is not."""
    model, tok = tiny
    contexts = [[7, 8, 9], [7, 8, 10, 11], [20]]
    continuations = []
    for context in contexts:
        ids = model.generate(torch.tensor([context]), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(context):].tolist()
        wrong = ids[:-1] + [(ids[-1] + 1) % model.config.vocab_size]
        continuations.append([ids, ids[:1], wrong])
    scores = score_continuations(model, tok.pad_token_id, contexts, continuations, batch_size=2, greedy=True)
    assert scores.greedy == [[True, True, False]] * 3


def test_shared_prefix_root_and_long_continuations(tiny):
    """A SharedPrefix as the tree's root (the label stage's few-shot examples); long continuations go through
    the fused LM head (no logits) when no argmax is asked for."""
    model, tok = tiny
    prefix = SharedPrefix.from_ids(model, [5, 6, 7, 8])
    contexts, continuations = _requests(1, model.config.vocab_size, questions=5)
    continuations[0].append(list(range(3, 60)))
    scores = score_continuations(model, tok.pad_token_id, contexts, continuations, batch_size=2, prefix=prefix)
    assert scores.greedy is None
    for q, (context, options) in enumerate(zip(contexts, continuations)):
        assert scores.logprobs[q] == pytest.approx([_naive(model, prefix.ids + context, c)[0] for c in options],
                                                   abs=1e-4)


def test_each_shared_token_runs_once(tiny, monkeypatch):
    """The forwards feed every distinct context prefix once, plus each continuation's tokens but its last."""
    model, tok = tiny
    head = list(range(10, 40))
    contexts = [head + [50 + i, 60] for i in range(6)]
    continuations = [[[70, 71, 72], [73]] for _ in contexts]
    fed = []
    trunk_forward = model.base_model.forward

    @functools.wraps(trunk_forward)  # keeps the signature cache_kwarg() reads
    def counting(*args, **kwargs):
        fed.append(int((kwargs["input_ids"] != tok.pad_token_id).sum()))
        return trunk_forward(*args, **kwargs)
    monkeypatch.setattr(model.base_model, "forward", counting)
    score_continuations(model, tok.pad_token_id, contexts, continuations, batch_size=8)
    assert sum(fed) == len(head) + 6 * 2 + 6 * 2
    assert len(fed) == 2  # the shared head, then the six contexts' own tokens with their continuations


@pytest.mark.parametrize("pack_tokens,batch_size,max_batch_tokens,shapes", [
    (256, 8, None, [(1, 24)]),  # the six siblings (4 tokens each) share one row
    (None, 8, None, [(6, 4)]),  # no packing: a row per sibling
    (10, 8, None, [(3, 8)]),  # two siblings a row
    (256, None, 8, [(1, 8)] * 3),  # rows capped by max_batch_tokens, one row a forward
])
def test_packing_sibling_nodes(tiny, monkeypatch, pack_tokens, batch_size, max_batch_tokens, shapes):
    """Sibling nodes share a row up to pack_tokens (and max_batch_tokens) tokens; the scores do not change."""
    model, tok = tiny
    head = list(range(10, 40))
    contexts = [head + [50 + i, 60] for i in range(6)]
    continuations = [[[70, 71, 72], [73 + i]] for i in range(6)]
    fed = []
    trunk_forward = model.base_model.forward

    @functools.wraps(trunk_forward)
    def recording(*args, **kwargs):
        fed.append(tuple(kwargs["input_ids"].shape))
        return trunk_forward(*args, **kwargs)
    monkeypatch.setattr(model.base_model, "forward", recording)
    scores = score_continuations(model, tok.pad_token_id, contexts, continuations, batch_size=batch_size,
                                 max_batch_tokens=max_batch_tokens, pack_tokens=pack_tokens, greedy=True)
    assert fed[1:] == shapes
    monkeypatch.undo()
    for q, (context, options) in enumerate(zip(contexts, continuations)):
        naive = [_naive(model, context, c) for c in options]
        assert scores.logprobs[q] == pytest.approx([n[0] for n in naive], abs=1e-4)
        assert scores.greedy[q] == [n[1] for n in naive]


def test_attention_mask_never_masks_a_whole_row():
    # one row: node 0 (2 tokens) with continuations 1 (2 tokens) and 2 (1 token), node 1 (1 token), padding
    segment = torch.tensor([[0, 0, 0, 0, 0, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 0]])
    path = torch.tensor([True, False, True])
    mask = _attention_mask(path, segment, branch, torch.float32)[0, 0] == 0
    assert mask.any(-1).all()
    assert mask[4, 3:].tolist() == [True, True, False, False, True, False, False]  # node tokens, own branch
    assert mask[3, 3:].tolist() == [True, True, True, True, False, False, False]
    assert mask[5, 3:].tolist() == [False] * 5 + [True, False]  # a packed sibling sees only itself and the path
    assert mask[:6, :3].tolist() == [[True, False, True]] * 6
    assert mask[6].tolist() == [False] * 3 + [False] * 6 + [True]


def test_greedy_matches_in_blocks():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(9, 8), torch.randn(50, 8), torch.randn(50)
    targets = torch.nn.functional.linear(hidden, weight, bias).argmax(-1)
    targets[::2] = (targets[::2] + 1) % 50
    expected = torch.arange(9) % 2 == 1
    assert torch.equal(greedy_matches(hidden, weight, bias, targets, max_block_bytes=50 * 4 * 2), expected)


def test_bad_requests(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="same length"):
        score_continuations(model, tok.pad_token_id, [[1]], [])
    with pytest.raises(ValueError, match="question 0"):
        score_continuations(model, tok.pad_token_id, [[]], [[[1]]])
    with pytest.raises(ValueError, match="question 1"):
        score_continuations(model, tok.pad_token_id, [[1], [2]], [[[1]], [[3], []]])
    with pytest.raises(ValueError, match="batch_size"):
        score_continuations(model, tok.pad_token_id, [[1]], [[[2]]], batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        score_continuations(model, tok.pad_token_id, [[1]], [[[2]]], max_batch_tokens=True)
    with pytest.raises(ValueError, match="pack_tokens"):
        score_continuations(model, tok.pad_token_id, [[1]], [[[2]]], pack_tokens=0)
    with pytest.raises(ValueError, match="pack_tokens"):
        score_continuations(model, tok.pad_token_id, [[1]], [[[2]]], pack_tokens=2.5)
