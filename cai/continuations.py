"""log p(continuation | context) for token ids, every shared token run once: the scorer behind `cai eval mc`,
the label stage and the lm-evaluation-harness backend.

The naive way (lm-eval's hf) runs one forward of context + continuation per request and a log-softmax over the
whole vocabulary at every position. Here:
  1. The contexts go into a prefix tree (a radix tree: a node holds the tokens its contexts share beyond its
     parent's). Each node's tokens run once, on a copy of its parent's KV cache, sibling nodes batched (short
     ones packed into one row, `pack_tokens`, a block-diagonal mask keeping them apart), the tree walked
     depth first so that only the caches on the current path are alive. Few-shot examples, an instruction,
     or a question asked with several answer lists (the paper's HHH file: 41% of its context
     tokens repeat an earlier context's prefix) cost nothing after their first time.
  2. Where contexts end, their continuations ride in the same forward: each continuation's tokens but its last
     are packed after the node's tokens in its row, with position ids that restart where the context ends
     and a 4D attention mask (tree attention) so each sees the context and its own earlier tokens only.
  3. The LM head is applied only at the positions that predict continuation tokens, through
     `cai_kernels.choice_logprobs` (per token log-probs summed per continuation, softmax over a question's
     continuations); `greedy` also takes the argmax there.
Causal attention makes this exact: every position sees the same tokens at the same positions as in its own
forward (checked bit for bit on SmolLM2 with transformers' SDPA attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import cai_kernels

from .models import SharedPrefix, cache_kwarg, lm_head, returned_cache, select_cache_rows

# logits of the continuation tokens of one forward are formed at once (for the argmax) up to this size
LOGITS_BLOCK_BYTES = 64 << 20


@dataclass
class ContinuationScores:
    """Per question, per continuation: the summed log-prob, its probability among the question's continuations
    (choice_logprobs: temperature, clamp), and whether every token is the argmax (None unless asked for)."""
    logprobs: list[list[float]]
    probs: list[list[float]]
    greedy: list[list[bool]] | None


@dataclass
class PrefixNode:
    """A radix-tree node: `tokens` follow its parent's, from position `start`; `contexts` end here."""
    tokens: list[int]
    start: int
    contexts: list[int] = field(default_factory=list)
    children: list[PrefixNode] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    shared = min(len(a), len(b))
    return next((i for i in range(shared) if a[i] != b[i]), shared)


def prefix_tree(contexts: list[list[int]], *, share: bool = True) -> PrefixNode:
    """The radix tree of non-empty `contexts` (equal ones end at one node). The root holds no tokens, every other
    node at least one, and siblings start with different tokens. share=False: every context is its own child of
    the root (nothing shared but equal contexts)."""
    root = PrefixNode(tokens=[], start=0)
    path, previous = [root], None
    for i in sorted(range(len(contexts)), key=lambda i: contexts[i]):
        tokens = contexts[i]
        if tokens == previous:  # sorted: equal contexts are neighbours
            path[-1].contexts.append(i)
            continue
        shared = longest_common_prefix(previous, tokens) if previous is not None and share else 0
        while path[-1].end > shared:  # climb to the node that ends at the shared length, splitting one
            node = path[-1]
            if node.start >= shared:
                path.pop()
                continue
            cut = shared - node.start
            upper = PrefixNode(tokens=node.tokens[:cut], start=node.start, children=[node])
            siblings = path[-2].children
            siblings[siblings.index(node)] = upper
            node.tokens, node.start = node.tokens[cut:], shared
            path[-1] = upper
        # sorted and distinct, so a context is never a prefix of the one before: tokens[shared:] is not empty
        leaf = PrefixNode(tokens=tokens[shared:], start=shared, contexts=[i])
        path[-1].children.append(leaf)
        path.append(leaf)
        previous = tokens
    return root


@dataclass
class _Parent:
    """What a node's children continue from: row `row` of a forward's KV `cache`, `mask` (L,) bool of the cache
    positions on the node's own path (its siblings, continuations and padding excluded), `length` real tokens
    on that path (the children's first position id)."""
    cache: object
    row: int
    mask: torch.Tensor
    length: int


@dataclass
class _Place:
    """Where a node sits in a packed forward: row, first column, and each of its continuations' first column."""
    row: int
    start: int
    continuation_starts: list[int]


@dataclass
class _Packed:
    """One forward: rows of sibling nodes, each node's tokens then its continuations' tokens but their last.

    ids, positions (R, W) int64, right-padded; segment (R, W): which node of the row a column belongs to (-1:
    padding); branch (R, W): 0 for a node's tokens, k for its continuation k (1-based); places: per node.
    """
    ids: torch.Tensor
    positions: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    places: list[_Place]


def _pack(rows: list[list[PrefixNode]], continuations_of, pad_id: int) -> _Packed:
    ids, positions, segments, branches, places = [], [], [], [], []
    for r, nodes in enumerate(rows):
        row_ids, row_positions, row_segments, row_branches = [], [], [], []
        for a, node in enumerate(nodes):
            place = _Place(row=r, start=len(row_ids), continuation_starts=[])
            row_ids += node.tokens
            row_positions += range(len(node.tokens))
            row_segments += [a] * len(node.tokens)
            row_branches += [0] * len(node.tokens)
            for k, continuation in enumerate(continuations_of(node), 1):
                fed = continuation[:-1]  # a continuation's last token is predicted, never fed
                place.continuation_starts.append(len(row_ids))
                row_ids += fed
                row_positions += range(len(node.tokens), len(node.tokens) + len(fed))
                row_segments += [a] * len(fed)
                row_branches += [k] * len(fed)
            places.append(place)
        ids.append(row_ids)
        positions.append(row_positions)
        segments.append(row_segments)
        branches.append(row_branches)
    width = max(len(r) for r in ids)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    return _Packed(ids=padded(ids, pad_id), positions=padded(positions, 0), segment=padded(segments, -1),
                   branch=padded(branches, 0), places=places)


def _attention_mask(path: torch.Tensor, segment: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype
                    ) -> torch.Tensor:
    """(R, 1, W, L + W) additive mask. A node's token sees the path (L,) its row continues and the node's earlier
    tokens; a continuation's token also sees its own continuation's earlier tokens; nothing sees another node of
    the row or another continuation. Padding sees only itself (an all-masked row would give NaN, which the
    values would carry into real rows)."""
    width = segment.shape[1]
    index = torch.arange(width, device=segment.device)
    real_q = segment[:, :, None] >= 0
    same_node = (segment[:, None, :] == segment[:, :, None]) & real_q
    same_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    new = (index[None, None, :] <= index[None, :, None]) & same_node & same_branch
    new |= torch.eye(width, dtype=torch.bool, device=segment.device)
    allowed = torch.cat([path[None, None, :] & real_q, new], -1)
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def _forward(model, parent: _Parent | None, rows: list[list[PrefixNode]], packed: _Packed):
    """(last hidden states (R, W, H), a _Parent per node, in packing order)."""
    device, trunk = model.device, model.base_model
    count = packed.ids.shape[0]
    segment, branch = packed.segment.to(device), packed.branch.to(device)
    kwargs, start = {}, 0
    path = torch.zeros(0, dtype=torch.bool, device=device)
    if parent is not None:
        select = torch.full((count,), parent.row, dtype=torch.long, device=device)
        kwargs[cache_kwarg(trunk)] = select_cache_rows(parent.cache, select)
        start, path = parent.length, parent.mask
    dtype = next(trunk.parameters()).dtype
    out = trunk(input_ids=packed.ids.to(device), attention_mask=_attention_mask(path, segment, branch, dtype),
                position_ids=start + packed.positions.to(device), use_cache=True, **kwargs)
    cache = returned_cache(out)
    own = (branch == 0) & (segment >= 0)
    parents = [_Parent(cache=cache, row=place.row, length=start + len(node.tokens),
                       mask=torch.cat([path, own[place.row] & (segment[place.row] == a)]))
               for (place, node, a) in zip(packed.places, (n for row in rows for n in row),
                                           (a for row in rows for a in range(len(row))))]
    return out.last_hidden_state, parents


def _rows(nodes: list[PrefixNode], row_length, pack_tokens: int) -> list[list[PrefixNode]]:
    """Sibling nodes packed into rows, first fit by decreasing length: a row holds up to `pack_tokens` tokens
    (a longer node has a row to itself); rows longest first."""
    rows: list[list[PrefixNode]] = []
    lengths: list[int] = []
    for node in sorted(nodes, key=lambda n: -row_length(n)):
        size = row_length(node)
        slot = next((i for i, used in enumerate(lengths) if used + size <= pack_tokens), None)
        if slot is None:
            rows.append([node])
            lengths.append(size)
        else:
            rows[slot].append(node)
            lengths[slot] += size
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    return [rows[i] for i in order]


def _batches(rows: list[list[PrefixNode]], row_length, batch_size: int | None, max_batch_tokens: int | None):
    """Rows (longest first) in forwards of at most batch_size rows and max_batch_tokens padded tokens (a row
    alone may exceed the latter)."""
    batch: list[list[PrefixNode]] = []
    for row in rows:
        width = sum(map(row_length, batch[0] if batch else row))
        if batch and ((batch_size and len(batch) >= batch_size)
                      or (max_batch_tokens and width * (len(batch) + 1) > max_batch_tokens)):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


@dataclass
class _Scored:
    """Per question: summed log-probs and probabilities of its continuations, greedy flags (when asked)."""
    logprobs: list[list[float]]
    probs: list[list[float]]
    greedy: list[list[bool]]


def _score(model, hidden: torch.Tensor, nodes: list[PrefixNode], places: list[_Place], continuation_ids, *,
           greedy: bool, temperature: float, clamp) -> tuple[list[int], _Scored] | None:
    """The continuations of the questions that end at `nodes`, from one forward's hidden (R, W, H):
    (their question indices, scores), or None when no question ends there."""
    gather, targets, option_index, questions = [], [], [], []
    width, flat = hidden.shape[1], 0
    for node, place in zip(nodes, places):
        last = place.row * width + place.start + len(node.tokens) - 1
        questions += node.contexts
        continuations = [c for q in node.contexts for c in continuation_ids[q]]
        for continuation, start in zip(continuations, place.continuation_starts):
            # token 0 is predicted at the node's last token, token j at fed token j - 1
            gather += [last] + [place.row * width + start + j for j in range(len(continuation) - 1)]
            targets += continuation
            option_index += [flat] * len(continuation)
            flat += 1
    if not questions:
        return None
    weight, bias = lm_head(model)
    device = hidden.device
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(gather, device=device))
    targets_t, options_t = torch.tensor(targets, device=device), torch.tensor(option_index, device=device)
    counts = torch.tensor([len(continuation_ids[q]) for q in questions], device=device)
    if greedy and rows.shape[0] * weight.shape[0] * 4 <= LOGITS_BLOCK_BYTES:
        logits = torch.nn.functional.linear(rows, weight, bias)  # one pass of the head: argmax and log-probs
        option_lp, option_p = cai_kernels.choice_logprobs(targets_t, options_t, counts, logits=logits,
                                                          temperature=temperature, clamp=clamp)
        hits = logits.argmax(-1) == targets_t
    else:
        option_lp, option_p = cai_kernels.choice_logprobs(targets_t, options_t, counts, hidden=rows, weight=weight,
                                                          bias=bias, temperature=temperature, clamp=clamp)
        hits = greedy_matches(rows, weight, bias, targets_t) if greedy else torch.ones_like(targets_t, dtype=bool)
    # a continuation is greedy when none of its tokens misses the argmax
    misses = torch.zeros(flat, dtype=torch.int32, device=device).index_add_(0, options_t, (~hits).to(torch.int32))
    greedy_flat = (misses == 0).tolist()
    option_lp, option_p = option_lp.double().tolist(), option_p.double().tolist()
    scored, flat = _Scored([], [], []), 0
    for row, q in enumerate(questions):
        count = len(continuation_ids[q])
        scored.logprobs.append(option_lp[row][:count])
        scored.probs.append(option_p[row][:count])
        scored.greedy.append(greedy_flat[flat:flat + count])
        flat += count
    return questions, scored


@torch.no_grad()
def score_continuations(model, pad_id: int, context_ids: list[list[int]], continuation_ids: list[list[list[int]]], *,
                        batch_size: int | None = None, max_batch_tokens: int | None = None,
                        pack_tokens: int | None = 256,
                        prefix: SharedPrefix | None = None, share_prefixes: bool = True, greedy: bool = False,
                        temperature: float = 1.0, clamp: tuple[float, float] | None = None,
                        progress=None) -> ContinuationScores:
    """Score `continuation_ids[q]` as continuations of `context_ids[q]` (question q; token ids as given, nothing
    added). `prefix`: a SharedPrefix whose tokens come before every context (its cache is the tree's root).

    Each node of the prefix tree brings its tokens and its questions' continuations but their last tokens;
    siblings share a row up to `pack_tokens` tokens, and at most `max_batch_tokens` (fewer, fuller forwards: a
    forward costs a read of every weight however few its tokens; the attention computed across packed siblings,
    then masked, stays small); None: one node per row. A packed sibling sees only its parent's path and its own
    tokens, at the position ids it would have alone. A forward holds at most `batch_size` rows and
    `max_batch_tokens` padded tokens (a row alone may exceed it); neither set: one row.
    `progress(n)`, when given, is called with the number of continuations each forward scored.
    """
    _check(context_ids, continuation_ids, batch_size, max_batch_tokens, pack_tokens)
    if batch_size is None and max_batch_tokens is None:
        batch_size = 1
    result = ContinuationScores([[] for _ in context_ids], [[] for _ in context_ids],
                                [[] for _ in context_ids] if greedy else None)

    def continuations_of(node: PrefixNode) -> list[list[int]]:
        return [c for q in node.contexts for c in continuation_ids[q]]

    def row_length(node: PrefixNode) -> int:
        return len(node.tokens) + sum(len(c) - 1 for c in continuations_of(node))

    # a packed row never outgrows the forward's token budget (a single node still may)
    pack = min(pack_tokens or 1, max_batch_tokens or pack_tokens or 1)

    def forwards(nodes: list[PrefixNode]):
        return _batches(_rows(nodes, row_length, pack), row_length, batch_size, max_batch_tokens)

    root_parent = None
    if prefix is not None:
        root_parent = _Parent(cache=prefix.cache, row=0, length=len(prefix),
                              mask=torch.ones(len(prefix), dtype=torch.bool, device=model.device))
    # depth first: a stack of (what the nodes continue, forwards of sibling rows still to run)
    stack = [(root_parent, forwards(prefix_tree(context_ids, share=share_prefixes).children))]
    while stack:
        parent, pending = stack[-1]
        rows = next(pending, None)
        if rows is None:
            stack.pop()
            continue
        packed = _pack(rows, continuations_of, pad_id)
        hidden, parents = _forward(model, parent, rows, packed)
        nodes = [n for row in rows for n in row]
        scored = _score(model, hidden, nodes, packed.places, continuation_ids, greedy=greedy,
                        temperature=temperature, clamp=clamp)
        if scored is not None:
            questions, scores = scored
            for i, q in enumerate(questions):
                result.logprobs[q], result.probs[q] = scores.logprobs[i], scores.probs[i]
                if greedy:
                    result.greedy[q] = scores.greedy[i]
            if progress is not None:
                progress(sum(len(continuation_ids[q]) for q in questions))
        stack.extend((node_parent, forwards(node.children))
                     for node_parent, node in reversed(list(zip(parents, nodes))) if node.children)
    return result


def greedy_matches(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                   max_block_bytes: int = LOGITS_BLOCK_BYTES) -> torch.Tensor:
    """(N,) bool: targets (N,) == argmax of the logits hidden (N, H) @ weight (V, H).T [+ bias], computed in row
    blocks of at most `max_block_bytes` of fp32 logits, so no (N, V) tensor exists at once."""
    rows = max(1, max_block_bytes // (weight.shape[0] * 4))
    return torch.cat([torch.nn.functional.linear(hidden[i:i + rows], weight, bias).argmax(-1) == targets[i:i + rows]
                      for i in range(0, hidden.shape[0], rows)])


def _check(context_ids, continuation_ids, batch_size, max_batch_tokens, pack_tokens) -> None:
    if len(context_ids) != len(continuation_ids):
        raise ValueError(f"context_ids and continuation_ids must have the same length; got {len(context_ids)} "
                         f"and {len(continuation_ids)}")
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens),
                        ("pack_tokens", pack_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    for q, (context, continuations) in enumerate(zip(context_ids, continuation_ids)):
        if not context or not continuations or not all(continuations):
            raise ValueError(f"question {q}: its context, its continuation list and each continuation must be "
                             f"non-empty; got {len(context)} context tokens and continuation lengths "
                             f"{[len(c) for c in continuations]}")
