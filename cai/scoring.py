"""Batched multiple-choice scoring: log p(option | prompt) for every option of every question.

The naive way runs one full forward per option (prompt + option) and a log-softmax over the whole vocabulary
at every position. Here, per batch of questions:
  1. the prompts are encoded once (left-padded, one forward, KV cache kept); a prefix they all share (few-shot
     examples) is encoded once for all batches (models.SharedPrefix);
  2. the options of all questions run as short continuations that share their question's KV cache
     (the cache rows are gathered per option; the options are right-padded to the longest one);
  3. the LM head is applied only at the positions that predict option tokens, inside
     `cai_kernels.choice_logprobs` (hidden + head weight), which also sums per option and normalizes.
The position that predicts an option's first token is the prompt's last one, shared by all its options, and
an option's last token is never fed to the model. Token ids: the prompt is tokenized on its own (with the
tokenizer's special tokens), each option on its own (without), and the two are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cai_kernels

from .models import (SharedPrefix, cache_kwarg, context_length, encode, fit_context, lm_head, pad_rows,
                     returned_cache, shared_prefix)


@dataclass
class OptionScores:
    """Per question: the summed log-prob of each option and its probability among the question's options."""
    logprobs: list[list[float]]
    probs: list[list[float]]


def tokenize_questions(tokenizer, prompts: list[str], options: list[list[str]], *, special: bool = True):
    """(prompt token lists, per-question lists of option token lists)."""
    prompt_ids = [encode(tokenizer, p, special=special) for p in prompts]
    empty = [q for q, ids in enumerate(prompt_ids) if not ids]
    if empty:  # the first option token is predicted from the prompt's last position: there must be one
        raise ValueError(f"question {empty[0]}: the prompt {prompts[empty[0]]!r} encodes to no tokens")
    option_ids = []
    for q, opts in enumerate(options):
        if not opts:
            raise ValueError(f"question {q} has no options")
        encoded = [encode(tokenizer, o, special=False) for o in opts]
        empty = [k for k, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"question {q}: option {empty[0]} ({opts[empty[0]]!r}) encodes to no tokens")
        option_ids.append(encoded)
    return prompt_ids, option_ids


def plan_batches(prompt_ids: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    """Question indices grouped so that each batch's padded prompt block stays near `max_batch_tokens`.

    Questions are taken longest first, which keeps padding small; results are put back in input order.
    """
    order = sorted(range(len(prompt_ids)), key=lambda q: -len(prompt_ids[q]))
    batches, current, width = [], [], 0
    for q in order:
        cost = max(width, len(prompt_ids[q])) * (len(current) + 1)
        if current and cost > max_batch_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(q)
        width = max(width, len(prompt_ids[q]))
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _score_batch(model, tokenizer, prompt_ids, option_ids, *, prefix: SharedPrefix | None, temperature, clamp):
    """option_logprobs (Q, K), probs (Q, K) for one batch of questions (K = most options of any question)."""
    device = model.device
    trunk = model.base_model
    pad = tokenizer.pad_token_id
    ids, mask = pad_rows(prompt_ids, pad, left=True)
    ids, mask = ids.to(device), mask.to(device)
    shared = len(prefix) if prefix is not None else 0
    kwargs = {cache_kwarg(trunk): prefix.cache_for(len(prompt_ids))} if shared else {}
    context_mask = torch.cat([mask.new_ones(len(prompt_ids), shared), mask], 1)  # prefix | padding | prompt
    positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
    out = trunk(input_ids=ids, attention_mask=context_mask, position_ids=positions, use_cache=True, **kwargs)
    last_hidden = out.last_hidden_state[:, -1]  # (Q, H): predicts every option's first token

    # every option of every question, flattened question by question
    question_of = [q for q, opts in enumerate(option_ids) for _ in opts]
    flat_options = [o for opts in option_ids for o in opts]
    feed = max(len(o) for o in flat_options) - 1  # an option's last token is never fed
    rows = [last_hidden]
    if feed > 0:
        cont_ids, cont_mask = pad_rows([o[:-1] for o in flat_options], pad, left=False)
        select = torch.tensor(question_of, device=device)
        cache = returned_cache(out)
        cache.batch_select_indices(select)
        cont_positions = (shared + mask.sum(-1))[select, None] + torch.arange(feed, device=device)
        cont_mask = torch.cat([context_mask[select], cont_mask.to(device)], 1)
        cont = trunk(input_ids=cont_ids.to(device), attention_mask=cont_mask,
                     position_ids=cont_positions, use_cache=False, **{cache_kwarg(trunk): cache})
        rows.append(cont.last_hidden_state.reshape(-1, last_hidden.shape[-1]))
    hidden_rows = torch.cat(rows)
    # for token j of option o: hidden at the prompt's last position (j == 0) or at fed option token j - 1
    gather, targets, option_index = [], [], []
    num_q = len(prompt_ids)
    for o, tokens in enumerate(flat_options):
        for j, token in enumerate(tokens):
            gather.append(question_of[o] if j == 0 else num_q + o * feed + j - 1)
            targets.append(token)
            option_index.append(o)
    hidden = hidden_rows.index_select(0, torch.tensor(gather, device=device))
    weight, bias = lm_head(model)
    return cai_kernels.choice_logprobs(
        torch.tensor(targets, device=device), torch.tensor(option_index, device=device),
        torch.tensor([len(opts) for opts in option_ids], device=device),
        hidden=hidden, weight=weight, bias=bias, temperature=temperature, clamp=clamp)


def score_options(model, tokenizer, prompts: list[str], options: list[list[str]], *, max_batch_tokens: int = 2048,
                  temperature: float = 1.0, clamp: tuple[float, float] | None = None,
                  prefix: str | SharedPrefix = "", overflow: str = "truncate-left",
                  progress: bool = False) -> OptionScores:
    """Log-probs and normalized probabilities of `options[q]` as continuations of `prompts[q]`.

    Questions may have different numbers of options and options of several tokens. `clamp=(lo, hi)`
    clamps the probabilities (CAI clamps chain-of-thought labels to (0.4, 0.6)). A `prefix` that every
    prompt starts with (few-shot examples) is encoded once and its KV cache shared by all questions.
    A prompt that does not fit in the model's context together with its options (and the prefix) is cut
    from the left (`overflow="truncate-left"`, kept after the prefix, with a warning that counts them)
    or refused (`overflow="error"`).
    """
    if len(prompts) != len(options):
        raise ValueError(f"prompts and options must have the same length; got {len(prompts)} and {len(options)}")
    shared, prompts = shared_prefix(model, tokenizer, prompts, prefix)
    prompt_ids, option_ids = tokenize_questions(tokenizer, prompts, options, special=shared is None)
    context = context_length(model)
    if context is not None:  # positions: prefix, prompt, then every option token but its last
        taken = len(shared) if shared is not None else 0
        room = [context - taken - (max(len(o) for o in opts) - 1) for opts in option_ids]
        prompt_ids = fit_context(prompt_ids, room, overflow, context=context, what="multiple-choice scoring")
    logprobs: list[list[float]] = [[] for _ in prompts]
    probs: list[list[float]] = [[] for _ in prompts]
    batches = plan_batches(prompt_ids, max_batch_tokens)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="scoring", unit="batch")
    for batch in batches:
        option_lp, option_p = _score_batch(model, tokenizer, [prompt_ids[q] for q in batch],
                                           [option_ids[q] for q in batch], prefix=shared, temperature=temperature,
                                           clamp=clamp)
        for row, q in enumerate(batch):
            k = len(option_ids[q])
            logprobs[q] = option_lp[row, :k].double().tolist()
            probs[q] = option_p[row, :k].double().tolist()
    return OptionScores(logprobs, probs)
