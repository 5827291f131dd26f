"""Multiple-choice scoring of text: log p(option | prompt) for every option of every question.

Prompts and options are tokenized here and scored by `cai.continuations.score_continuations`: the prompts'
shared prefixes run once (a prefix tree; a SharedPrefix given by the caller, e.g. few-shot examples reused
across calls, is its root), each question's options ride in its prompt's forward (tree attention), and the LM
head is applied only at option tokens inside `cai_kernels.choice_logprobs`, which also sums per option and
normalizes. Token ids: the prompt is tokenized on its own (with the tokenizer's special tokens unless a
SharedPrefix comes first), each option on its own (without), and the two are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

from .continuations import score_continuations
from .models import SharedPrefix, context_length, encode, fit_context, shared_prefix


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


def score_options(model, tokenizer, prompts: list[str], options: list[list[str]], *, max_batch_tokens: int = 2048,
                  temperature: float = 1.0, clamp: tuple[float, float] | None = None,
                  prefix: str | SharedPrefix = "", overflow: str = "truncate-left",
                  progress: bool = False) -> OptionScores:
    """Log-probs and normalized probabilities of `options[q]` as continuations of `prompts[q]`.

    Questions may have different numbers of options and options of several tokens. `clamp=(lo, hi)`
    clamps the probabilities (CAI clamps chain-of-thought labels to (0.4, 0.6)). A `prefix` that every
    prompt starts with (few-shot examples) is encoded once and its KV cache shared by all questions; other
    shared prefixes are found and shared too. A forward holds about `max_batch_tokens` padded tokens.
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
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(o) for o in option_ids), desc="scoring", unit="option")
    scores = score_continuations(model, tokenizer.pad_token_id, prompt_ids, option_ids,
                                 max_batch_tokens=max_batch_tokens, prefix=shared, temperature=temperature,
                                 clamp=clamp, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    return OptionScores(scores.logprobs, scores.probs)
