"""log p(continuation | context) for token ids, every shared token run once: the scorer behind `cai eval mc`,
the label stage and the lm-evaluation-harness backend.

The naive way (lm-eval's hf) runs one forward of context + continuation per request and a log-softmax over the
whole vocabulary at every position. Here:
  1. The contexts go into a prefix tree (a radix tree: a node holds the tokens its contexts share beyond its
     parent's). Each node's tokens run once, on a copy of its parent's KV cache, sibling nodes batched, the
     tree walked depth first so that only the caches on the current path are alive. Few-shot examples, an
     instruction, or a question asked with several answer lists (the paper's HHH file: 41% of its context
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
class _Rows:
    """A forward's KV cache and, per row, what a child node continues from: mask (R, L) bool of the positions
    on the row's own path (its continuations and padding excluded) and its real length (next position id)."""
    cache: object
    mask: torch.Tensor
    length: list[int]


@dataclass
class _Packed:
    """The rows of one forward: per node its tokens, then each continuation's tokens but the last, right-padded.

    block (R, W) int64: 0 for the node's tokens, q+1 for continuation q of the row's questions, -1 for padding;
    offsets[r][q] = where continuation q's fed tokens start in row r.
    """
    ids: torch.Tensor
    block: torch.Tensor
    positions: torch.Tensor
    offsets: list[list[int]]


def _pack(nodes: list[PrefixNode], continuations: list[list[list[int]]], pad_id: int) -> _Packed:
    rows, blocks, positions, offsets = [], [], [], []
    for node in nodes:
        tokens, block, position, starts = list(node.tokens), [0] * len(node.tokens), list(range(len(node.tokens))), []
        for q, continuation in enumerate(c for context in node.contexts for c in continuations[context]):
            starts.append(len(tokens))
            fed = continuation[:-1]  # a continuation's last token is predicted, never fed
            tokens += fed
            block += [q + 1] * len(fed)
            position += range(len(node.tokens), len(node.tokens) + len(fed))
        rows.append(tokens)
        blocks.append(block)
        positions.append(position)
        offsets.append(starts)
    width = max(len(r) for r in rows)

    def padded(values, fill):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    return _Packed(ids=padded(rows, pad_id), block=padded(blocks, -1), positions=padded(positions, 0),
                   offsets=offsets)


def _attention_mask(parent_mask: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, W, L + W) additive mask: a node token sees its path and the node's earlier tokens; a continuation
    token sees those and its own continuation's earlier tokens; padding sees only itself (no all-masked row,
    whose NaN would reach other rows through the values)."""
    width = block.shape[1]
    index = torch.arange(width, device=block.device)
    real_q, real_k = block[:, :, None] >= 0, block[:, None, :] >= 0
    same_branch = (block[:, None, :] == 0) | (block[:, None, :] == block[:, :, None])
    new = (index[None, None, :] <= index[None, :, None]) & real_q & real_k & same_branch
    new |= torch.eye(width, dtype=torch.bool, device=block.device)
    old = parent_mask[:, None, :] & real_q
    allowed = torch.cat([old, new], -1)
    return torch.zeros(allowed.shape, dtype=dtype, device=block.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def _forward(model, parent: _Rows | None, parent_row: int, packed: _Packed):
    """(last hidden states (R, W, H), the rows' _Rows for their children)."""
    device, trunk = model.device, model.base_model
    count = packed.ids.shape[0]
    block = packed.block.to(device)
    kwargs, start = {}, 0
    if parent is not None:
        select = torch.full((count,), parent_row, dtype=torch.long, device=device)
        kwargs[cache_kwarg(trunk)] = select_cache_rows(parent.cache, select)
        start = parent.length[parent_row]
        path = parent.mask[select]
    else:
        path = torch.zeros(count, 0, dtype=torch.bool, device=device)
    dtype = next(trunk.parameters()).dtype
    out = trunk(input_ids=packed.ids.to(device), attention_mask=_attention_mask(path, block, dtype),
                position_ids=start + packed.positions.to(device), use_cache=True, **kwargs)
    own = (block == 0).sum(-1).tolist()
    return out.last_hidden_state, _Rows(cache=returned_cache(out), mask=torch.cat([path, block == 0], 1),
                                        length=[start + n for n in own])


def _batches(nodes: list[PrefixNode], row_length, batch_size: int | None, max_batch_tokens: int | None):
    """Sibling nodes, longest rows first, in batches of at most batch_size rows and max_batch_tokens padded
    tokens (a row alone may exceed the latter)."""
    nodes = sorted(nodes, key=lambda n: -row_length(n))
    batch: list[PrefixNode] = []
    for node in nodes:
        width = row_length(batch[0]) if batch else row_length(node)
        if batch and ((batch_size and len(batch) >= batch_size)
                      or (max_batch_tokens and width * (len(batch) + 1) > max_batch_tokens)):
            yield batch
            batch = []
        batch.append(node)
    if batch:
        yield batch


@torch.no_grad()
def score_continuations(model, pad_id: int, context_ids: list[list[int]], continuation_ids: list[list[list[int]]], *,
                        batch_size: int | None = None, max_batch_tokens: int | None = None,
                        prefix: SharedPrefix | None = None, share_prefixes: bool = True, greedy: bool = False,
                        temperature: float = 1.0, clamp: tuple[float, float] | None = None,
                        progress=None) -> ContinuationScores:
    """Score `continuation_ids[q]` as continuations of `context_ids[q]` (question q; token ids as given, nothing
    added). `prefix`: a SharedPrefix whose tokens come before every context (its cache is the tree's root).

    A forward holds at most `batch_size` sibling nodes and `max_batch_tokens` padded tokens (each node's row is
    its tokens plus its questions' continuations but their last tokens); neither set: one node per forward.
    `progress(n)`, when given, is called with the number of continuations each forward scored.
    """
    _check(context_ids, continuation_ids, batch_size, max_batch_tokens)
    weight, bias = lm_head(model)
    logprobs: list[list[float]] = [[] for _ in context_ids]
    probs: list[list[float]] = [[] for _ in context_ids]
    matches: list[list[bool]] = [[] for _ in context_ids]
    if batch_size is None and max_batch_tokens is None:
        batch_size = 1

    def row_length(node: PrefixNode) -> int:
        return len(node.tokens) + sum(len(c) - 1 for q in node.contexts for c in continuation_ids[q])

    def score(hidden: torch.Tensor, nodes: list[PrefixNode], packed: _Packed) -> None:
        """The continuations of the questions that end at `nodes`, from the forward's hidden (R, W, H)."""
        gather, targets, option_index, questions = [], [], [], []
        width, flat = hidden.shape[1], 0
        for r, node in enumerate(nodes):
            last = r * width + len(node.tokens) - 1
            continuations = [c for q in node.contexts for c in continuation_ids[q]]
            questions += node.contexts
            for continuation, start in zip(continuations, packed.offsets[r]):
                # token 0 is predicted at the node's last token, token j at fed token j - 1
                gather += [last] + [r * width + start + j for j in range(len(continuation) - 1)]
                targets += continuation
                option_index += [flat] * len(continuation)
                flat += 1
        if not questions:
            return
        device = hidden.device
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(gather, device=device))
        targets_t, options_t = torch.tensor(targets, device=device), torch.tensor(option_index, device=device)
        counts = torch.tensor([len(continuation_ids[q]) for q in questions], device=device)
        small = rows.shape[0] * weight.shape[0] * 4 <= LOGITS_BLOCK_BYTES
        if greedy and small:  # one pass of the LM head for both the argmax and the log-probs
            logits = torch.nn.functional.linear(rows, weight, bias)
            option_lp, option_p = cai_kernels.choice_logprobs(targets_t, options_t, counts, logits=logits,
                                                              temperature=temperature, clamp=clamp)
            hits = logits.argmax(-1) == targets_t
        else:
            option_lp, option_p = cai_kernels.choice_logprobs(targets_t, options_t, counts, hidden=rows,
                                                              weight=weight, bias=bias, temperature=temperature,
                                                              clamp=clamp)
            hits = greedy_matches(rows, weight, bias, targets_t) if greedy else None
        if greedy:  # a continuation is greedy when none of its tokens misses the argmax
            misses = torch.zeros(flat, dtype=torch.int32, device=device).index_add_(0, options_t,
                                                                                   (~hits).to(torch.int32))
            greedy_flat = (misses == 0).tolist()
        option_lp, option_p = option_lp.double().tolist(), option_p.double().tolist()
        flat = 0
        for row, q in enumerate(questions):
            count = len(continuation_ids[q])
            logprobs[q], probs[q] = option_lp[row][:count], option_p[row][:count]
            if greedy:
                matches[q] = greedy_flat[flat:flat + count]
            flat += count
        if progress is not None:
            progress(flat)

    root_rows = None
    if prefix is not None:
        root_rows = _Rows(cache=prefix.cache, mask=torch.ones(1, len(prefix), dtype=torch.bool, device=model.device),
                          length=[len(prefix)])
    root = prefix_tree(context_ids, share=share_prefixes)
    # depth first: a stack of (parent rows, parent row, batches of its children still to run)
    stack = [(root_rows, 0, _batches(root.children, row_length, batch_size, max_batch_tokens))]
    while stack:
        parent, parent_row, batches = stack[-1]
        nodes = next(batches, None)
        if nodes is None:
            stack.pop()
            continue
        packed = _pack(nodes, continuation_ids, pad_id)
        hidden, rows = _forward(model, parent, parent_row, packed)
        score(hidden, nodes, packed)
        stack.extend((rows, r, _batches(node.children, row_length, batch_size, max_batch_tokens))
                     for r, node in reversed(list(enumerate(nodes))) if node.children)
    return ContinuationScores(logprobs, probs, matches if greedy else None)


def greedy_matches(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                   max_block_bytes: int = LOGITS_BLOCK_BYTES) -> torch.Tensor:
    """(N,) bool: targets (N,) == argmax of the logits hidden (N, H) @ weight (V, H).T [+ bias], computed in row
    blocks of at most `max_block_bytes` of fp32 logits, so no (N, V) tensor exists at once."""
    rows = max(1, max_block_bytes // (weight.shape[0] * 4))
    return torch.cat([torch.nn.functional.linear(hidden[i:i + rows], weight, bias).argmax(-1) == targets[i:i + rows]
                      for i in range(0, hidden.shape[0], rows)])


def _check(context_ids, continuation_ids, batch_size, max_batch_tokens) -> None:
    if len(context_ids) != len(continuation_ids):
        raise ValueError(f"context_ids and continuation_ids must have the same length; got {len(context_ids)} "
                         f"and {len(continuation_ids)}")
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    for q, (context, continuations) in enumerate(zip(context_ids, continuation_ids)):
        if not context or not continuations or not all(continuations):
            raise ValueError(f"question {q}: its context, its continuation list and each continuation must be "
                             f"non-empty; got {len(context)} context tokens and continuation lengths "
                             f"{[len(c) for c in continuations]}")
