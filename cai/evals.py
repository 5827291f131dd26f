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
