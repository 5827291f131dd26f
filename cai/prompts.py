"""The text of the CAI requests: critique/revision transcripts and multiple-choice preference questions.

Critique/revision conversations are lists of turns rendered by `models.PromptFormat` (chat template or raw).
Preference questions are raw text (the paper's feedback model is a plain language model reading
``Consider the following conversation ... Options: (A) ... (B) ... The answer is:``) scored on the
continuations " (A)" / " (B)".
"""

from __future__ import annotations

import hashlib
import random

from .constitution import RAW_LABELS, Constitution, CritiquePrinciple, LabelExample, Turn

OPTION_LETTERS = "ABCDEFGHIJ"


def rng_for(*keys) -> random.Random:
    """A random generator determined by `keys` alone (not by process state), so resumed runs redraw the same."""
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def seed_for(*keys) -> int:
    return rng_for(*keys).randrange(2**31)


def critique_fewshot(constitution: Constitution, count: int | None) -> list[Turn]:
    """The first `count` critique/revision examples as one run of turns (all of them when None)."""
    examples = constitution.critique_examples if count is None else constitution.critique_examples[:count]
    return [turn for example in examples for turn in example.turns()]


def critique_request(principle: CritiquePrinciple) -> Turn:
    return Turn("critique_request", principle.critique)


def revision_request(principle: CritiquePrinciple) -> Turn:
    return Turn("revision_request", principle.revision)


def _conversation_text(turns) -> str:
    return "".join(f"\n\n{RAW_LABELS[t.role]}: {t.text}" for t in turns)


def choice_question(conversation: list[Turn] | tuple[Turn, ...], principle: str, responses: list[str]) -> str:
    """A multiple-choice preference question ending in "The answer is:" (options are " (A)", " (B)", ...)."""
    options = "".join(f"\n({OPTION_LETTERS[k]}) {r.strip()}" for k, r in enumerate(responses))
    return (f"Consider the following conversation between a human and an assistant:"
            f"{_conversation_text(conversation)}\n\n{principle.strip()}\nOptions:{options}\nThe answer is:")


def option_strings(count: int) -> list[str]:
    return [f" ({OPTION_LETTERS[k]})" for k in range(count)]


def label_fewshot(examples, principle: str, *, chain_of_thought: bool = False) -> str:
    """Worked labelling examples, each a full question with its answer, to put in front of a question.

    The better reply sits at (A) in even-numbered examples and at (B) in odd ones, so the examples do not
    teach a position. With chain-of-thought each example shows its reasoning before the answer; the
    paper's raw chain-of-thought examples are used as published, their ``{}`` slot filled with `principle`.
    """
    blocks = []
    for i, example in enumerate(examples):
        if example.raw is not None:
            blocks.append(example.raw.replace("{}", principle.strip(), 1).strip())
            continue
        responses = [example.chosen, example.rejected] if i % 2 == 0 else [example.rejected, example.chosen]
        answer = " (A)" if i % 2 == 0 else " (B)"
        question = choice_question(example.conversation, principle, responses)
        if chain_of_thought:
            reasoning = example.reasoning or "The better reply is the one that is less harmful."
            blocks.append(f"{question[:-len('The answer is:')]}Let's think step by step: {reasoning.strip()}"
                          f"\nSo the answer is:{answer}")
        else:
            blocks.append(question + answer)
    return "\n\n\n".join(blocks) + ("\n\n\n" if blocks else "")


def cot_cue() -> str:
    """Appended (in place of "The answer is:") when the feedback model reasons before answering."""
    return "Let's think step by step:"


def cot_answer_cue() -> str:
    return "\nSo the answer is:"


def pick_label_examples(constitution: Constitution, count: int, chain_of_thought: bool) -> tuple[LabelExample, ...]:
    pool = constitution.cot_label_examples if chain_of_thought and constitution.cot_label_examples \
        else constitution.label_examples
    return tuple(pool[:count])
