"""Multiple-choice evals in the paper's format (`prompt`, `corrects`, `incorrects`).

A question is answered correctly when one of its correct options has the highest log-probability (ties go
to the first option listed, a correct one). Probabilities are the options' log-probs normalized over the
question's options, correct options first.
"""

from __future__ import annotations

import time

from .data import MCQuestion
from .scoring import score_options


def mc_eval(model, tokenizer, questions: list[MCQuestion], *, max_batch_tokens: int = 2048,
            overflow: str = "truncate-left", progress: bool = False) -> dict:
    """{"n", "accuracy", "mean_correct_prob", "seconds", "probs": [[p(option) ...] per question]}.

    No questions is a ValueError (an accuracy of nothing is not a number to report). Prompts too long for
    the model's context: `overflow` (see cai.scoring.score_options).
    """
    if not questions:
        raise ValueError("no questions to evaluate")
    start = time.perf_counter()
    scores = score_options(model, tokenizer, [q.prompt for q in questions], [list(q.options) for q in questions],
                           max_batch_tokens=max_batch_tokens, overflow=overflow, progress=progress)
    seconds = time.perf_counter() - start
    correct = sum(max(range(len(p)), key=p.__getitem__) < q.num_correct for p, q in zip(scores.probs, questions))
    correct_mass = [sum(p[:q.num_correct]) for p, q in zip(scores.probs, questions)]
    n = len(questions)
    return {"n": n, "accuracy": correct / n, "mean_correct_prob": sum(correct_mass) / n, "seconds": seconds,
            "probs": scores.probs}


# ----------------------------------------------------------------------------------------------------------
# Chain-of-thought multiple choice, the preference model on comparisons, finding eval files
# ----------------------------------------------------------------------------------------------------------

def mc_eval_cot(model, tokenizer, questions: list[MCQuestion], *, samples: int = 1, temperature: float | None = None,
                max_new_tokens: int = 128, fewshot: str = "", batch_size: int = 8, max_batch_tokens: int = 2048,
                seed: int = 0, overflow: str = "truncate-left", progress: bool = False) -> dict:
    """Multiple choice with chain-of-thought: each question as a Human/Assistant dialogue
    (`prompts.mc_prompt_as_cot`), the model reasons after "Let's think step by step:", then the options are
    scored after "So the answer is:". With `samples` > 1 the reasoning is sampled that many times (at
    `temperature`, default 1) and the options' probabilities averaged over the samples (the paper's ensembled
    chain-of-thought); one sample is greedy unless `temperature` is given. `fewshot`: worked chain-of-thought
    examples in front of every question (their KV cache is shared). Same result keys as `mc_eval`, plus
    "reasoning" (the first sample's text per question)."""
    from .models import SharedPrefix, generate
    from .prompts import cot_answer_cue, cot_stop_strings, mc_prompt_as_cot

    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    if not questions:
        raise ValueError("no questions to evaluate")
    start = time.perf_counter()
    temperature = (0.0 if samples == 1 else 1.0) if temperature is None else temperature
    prefix = SharedPrefix(model, tokenizer, fewshot) if fewshot else ""
    asks = [fewshot + mc_prompt_as_cot(q.prompt) for q in questions]
    options = [list(q.options) for q in questions]
    totals = [[0.0] * len(q.options) for q in questions]
    reasoning = [""] * len(questions)
    rounds = range(samples)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc="chain-of-thought samples", unit="sample")
    for k in rounds:
        thoughts = generate(model, tokenizer, asks, prefix=prefix, max_new_tokens=max_new_tokens,
                            temperature=temperature, batch_size=batch_size, seed=seed + 1000 * k,
                            stop=cot_stop_strings(), overflow=overflow)
        scores = score_options(model, tokenizer, [a + " " + t + cot_answer_cue() for a, t in zip(asks, thoughts)],
                               options, prefix=prefix, max_batch_tokens=max_batch_tokens, overflow=overflow)
        for q, p in enumerate(scores.probs):
            totals[q] = [t + x / samples for t, x in zip(totals[q], p)]
        if k == 0:
            reasoning = thoughts
    seconds = time.perf_counter() - start
    correct = sum(max(range(len(p)), key=p.__getitem__) < q.num_correct for p, q in zip(totals, questions))
    correct_mass = [sum(p[:q.num_correct]) for p, q in zip(totals, questions)]
    n = len(questions)
    return {"n": n, "accuracy": correct / n if n else float("nan"),
            "mean_correct_prob": sum(correct_mass) / n if n else float("nan"), "seconds": seconds,
            "probs": totals, "reasoning": reasoning, "samples": samples}


def cot_fewshot(count: int, *, seed: int = 0) -> str:
    """`count` worked chain-of-thought labelling examples of our default constitution, each with its own
    principle drawn by `seed`: the few-shot block `mc_eval_cot` puts in front of eval questions."""
    from .constitution import load_constitution
    from .feedback import fewshot_principles
    from .prompts import label_fewshot, pick_label_examples

    if count <= 0:
        return ""
    constitution = load_constitution("default")
    examples = pick_label_examples(constitution, count, chain_of_thought=True)
    principles = fewshot_principles(constitution.choice_principles, len(examples), seed, "eval-mc-cot")
    return label_fewshot(examples, [p.text for p in principles], chain_of_thought=True)


def pm_comparison_accuracy(pm, comparisons: list[dict], *, batch_size: int = 8, max_length: int | None = 1024) -> dict:
    """The preference model on comparisons {"prompt", "chosen", "rejected"}: {"n", "accuracy" (share with
    reward(chosen) > reward(rejected)), "rewards": [(chosen, rejected)], "seconds"}."""
    start = time.perf_counter()
    prompts = [c["prompt"] for c in comparisons]
    chosen = pm.score(prompts, [c["chosen"] for c in comparisons], batch_size=batch_size, max_length=max_length)
    rejected = pm.score(prompts, [c["rejected"] for c in comparisons], batch_size=batch_size, max_length=max_length)
    n = len(comparisons)
    correct = sum(a > b for a, b in zip(chosen, rejected))
    return {"n": n, "accuracy": correct / n if n else float("nan"), "rewards": list(zip(chosen, rejected)),
            "seconds": time.perf_counter() - start}
