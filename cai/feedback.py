"""The feedback model compares two replies: a multiple-choice question scored on " (A)" vs " (B)".

Shared by the `label` stage (the preference model's AI labels) and the `evaluate` stage's judge. For a pair
(prompt, response_a, response_b):
  * principles: `principles_per_comparison` are drawn from the pool for the pair (from the seed, the stage and
    the pair's id, so a resumed run draws the same ones); the paper draws one per comparison;
  * orders: with `both_orders` every principle is asked twice, the responses swapped the second time, and the
    two answers averaged (cancels position bias); without it one order is drawn per (pair, principle);
  * the few-shot labelling examples go in front of every question, each with its own principle drawn once for
    the run, so the block is the same text everywhere and its KV cache is encoded once (models.SharedPrefix);
  * chain_of_thought: the question is a Human/Assistant dialogue (prompts.cot_question); the model reasons after
    "Let's think step by step:", then " (A)" / " (B)" are scored after the answer cue, the probabilities
    clamped to `clamp` (the paper: 0.4-0.6), since reasoning makes the model over-confident.
p_a is the mean over principles of the (order-averaged) probability that response_a is the better one.

Cost per pair: principles_per_comparison x (2 if both_orders else 1) scored questions, each also a generation of
up to cot_max_new_tokens tokens with chain-of-thought.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constitution import ChoicePrinciple, LabelExample
from .models import SharedPrefix, generate
from .prompts import (choice_question, cot_answer_cue, cot_question, cot_stop_strings, label_fewshot,
                      option_strings, prompt_turns, rng_for)
from .scoring import score_options


@dataclass(frozen=True)
class CompareSettings:
    principles_per_comparison: int = 1
    both_orders: bool = True
    chain_of_thought: bool = False
    cot_max_new_tokens: int = 96
    cot_temperature: float = 0.0  # 0: greedy reasoning
    clamp: tuple[float, float] | None = None  # clamps chain-of-thought answers only
    max_batch_tokens: int = 2048
    overflow: str = "truncate-left"  # questions longer than the model's context (cai.models.fit_context)

    def questions_per_pair(self) -> int:
        return self.principles_per_comparison * (2 if self.both_orders else 1)


def fewshot_principles(pool, count: int, seed: int, stage: str) -> list[ChoicePrinciple]:
    """The principle of each of `count` few-shot examples: distinct while the pool lasts, drawn once per run."""
    if not pool or count == 0:
        return []
    rng = rng_for(seed, stage, "fewshot")
    picks = []
    while len(picks) < count:
        picks += rng.sample(range(len(pool)), min(len(pool), count - len(picks)))
    return [pool[j] for j in picks]


class Comparer:
    """Asks `model` which of two replies is better, by `principles` (ChoicePrinciple pool).

    `stage` names the draws (principles per pair, orders, few-shot principles), so the label stage and each
    judge criterion draw independently. `examples` are the few-shot labelling examples (LabelExample).
    """

    def __init__(self, model, tokenizer, principles: tuple[ChoicePrinciple, ...] | list[ChoicePrinciple],
                 examples: tuple[LabelExample, ...] | list[LabelExample], settings: CompareSettings, *, seed: int,
                 stage: str):
        if not principles:
            raise ValueError(f"{stage}: no principles to compare by")
        if settings.principles_per_comparison < 1:
            raise ValueError(f"principles_per_comparison must be >= 1; got {settings.principles_per_comparison}")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.principles, self.seed, self.stage = tuple(principles), seed, stage
        self.example_principles = fewshot_principles(self.principles, len(examples), seed, stage)
        text = label_fewshot(examples, [p.text for p in self.example_principles],
                             chain_of_thought=settings.chain_of_thought)
        # the examples are the same text in front of every question: encoded once
        self.prefix = SharedPrefix(model, tokenizer, text) if examples else None
        self.options = option_strings(2)

    @property
    def prefix_text(self) -> str:
        return self.prefix.text if self.prefix is not None else ""

    def draw(self, pair_id: str) -> list[ChoicePrinciple]:
        picks = rng_for(self.seed, self.stage, pair_id).sample(
            range(len(self.principles)), min(self.settings.principles_per_comparison, len(self.principles)))
        return [self.principles[j] for j in picks]

    def questions(self, pairs: list[dict]) -> list[dict]:
        """One question per (pair, drawn principle, order): {"pair", "principle", "swapped", "text"}."""
        make = cot_question if self.settings.chain_of_thought else choice_question
        questions = []
        for i, row in enumerate(pairs):
            for principle in self.draw(row["id"]):
                if self.settings.both_orders:
                    orders = (False, True)
                else:  # one order, drawn, so that position bias averages out over the data set
                    orders = (rng_for(self.seed, self.stage, row["id"], principle.id, "order").random() < 0.5,)
                for swapped in orders:
                    responses = [row["response_b"], row["response_a"]] if swapped else [row["response_a"],
                                                                                        row["response_b"]]
                    questions.append({"pair": i, "principle": principle, "swapped": swapped,
                                      "text": make(prompt_turns(row["prompt"]), principle.text, responses)})
        return questions

    def answer(self, questions: list[dict], seed: int) -> tuple[list[list[float]], list[str]]:
        """(probabilities of (A), (B) per question, reasoning per question ("" without chain-of-thought))."""
        s = self.settings
        asks = [self.prefix_text + q["text"] for q in questions]
        prefix = self.prefix or ""
        if not s.chain_of_thought:
            probs = score_options(self.model, self.tokenizer, asks, [self.options] * len(asks), prefix=prefix,
                                  max_batch_tokens=s.max_batch_tokens, overflow=s.overflow).probs
            return probs, [""] * len(questions)
        thoughts = generate(self.model, self.tokenizer, asks, prefix=prefix, max_new_tokens=s.cot_max_new_tokens,
                            temperature=s.cot_temperature, batch_size=len(asks), seed=seed, stop=cot_stop_strings(),
                            overflow=s.overflow)
        answers = [a + " " + t + cot_answer_cue() for a, t in zip(asks, thoughts)]
        probs = score_options(self.model, self.tokenizer, answers, [self.options] * len(asks), prefix=prefix,
                              max_batch_tokens=s.max_batch_tokens, clamp=tuple(s.clamp) if s.clamp else None,
                              overflow=s.overflow).probs
        return probs, thoughts

    def compare(self, pairs: list[dict], seed: int) -> list[dict]:
        """Per pair: p_a, principle_ids, principle_probs (p_a per principle), first_position_prob (mean
        probability given to whichever reply was shown as (A): 0.5 = no position bias), reasoning."""
        questions = self.questions(pairs)
        probs, reasoning = self.answer(questions, seed)
        return pair_results(pairs, questions, probs, reasoning)


def pair_results(pairs: list[dict], questions: list[dict], probs, reasoning) -> list[dict]:
    """Average each pair's answers: over the orders per principle, then over principles."""
    out = []
    for i, _ in enumerate(pairs):
        per_principle, first_position, thoughts = {}, [], []
        for q, p, thought in zip(questions, probs, reasoning):
            if q["pair"] != i:
                continue
            per_principle.setdefault(q["principle"].id, []).append(p[1] if q["swapped"] else p[0])
            first_position.append(p[0])
            if thought:
                thoughts.append(thought)
        principle_probs = [sum(v) / len(v) for v in per_principle.values()]
        out.append({"p_a": sum(principle_probs) / len(principle_probs), "principle_ids": list(per_principle),
                    "principle_probs": principle_probs,
                    "first_position_prob": sum(first_position) / len(first_position), "reasoning": thoughts})
    return out
