"""The naive multiple-choice scorer the batched one (cai.scoring) is tested against.

One full forward per option over prompt + option, a float64 log-softmax over the whole vocabulary at every
position, and the option's log-prob summed from the positions that predict its tokens. Token ids: the
prompt with the tokenizer's special tokens, then the option without, concatenated.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def naive_option_logprobs(model, tokenizer, prompt: str, options: list[str]) -> list[float]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    result = []
    for option in options:
        option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + option_ids], device=model.device)
        log_probs = model(ids).logits[0].double().log_softmax(-1)
        start = len(prompt_ids) - 1  # the position that predicts the option's first token
        result.append(sum(log_probs[start + j, t].item() for j, t in enumerate(option_ids)))
    return result


def normalize(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    return [w / sum(weights) for w in weights]


def naive_mc_eval(model, tokenizer, questions) -> dict:
    """accuracy and per-question option probabilities (correct options first), like `cai eval mc --json`."""
    probs, correct = [], 0
    for q in questions:
        p = normalize(naive_option_logprobs(model, tokenizer, q.prompt, list(q.options)))
        probs.append(p)
        correct += max(range(len(p)), key=p.__getitem__) < q.num_correct
    return {"n": len(questions), "accuracy": correct / max(len(questions), 1), "probs": probs}
