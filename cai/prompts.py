"""The text of the CAI requests: critique/revision transcripts and multiple-choice preference questions.

Critique/revision conversations are lists of turns rendered by `models.PromptFormat` (chat template or raw).
Preference questions are raw text (the paper's feedback model is a plain language model reading
``Consider the following conversation ... Options: (A) ... (B) ... The answer is:``) scored on the
continuations " (A)" / " (B)".
"""

from __future__ import annotations

import hashlib
import random

from .constitution import RAW_LABELS, Constitution, CritiquePrinciple, LabelExample, Turn, parse_raw_transcript

OPTION_LETTERS = "ABCDEFGHIJ"


def rng_for(*keys) -> random.Random:
    """A random generator determined by `keys` alone (not by process state), so resumed runs redraw the same."""
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def seed_for(*keys) -> int:
    return rng_for(*keys).randrange(2**31)


def critique_fewshot(constitution: Constitution, count: int | None, *, critique: bool = True) -> list[Turn]:
    """The first `count` critique/revision examples as one run of turns (all of them when None).

    critique=False: the examples without their critiques (request, revision only), for critique-free revision.
    """
    examples = constitution.critique_examples if count is None else constitution.critique_examples[:count]
    return [turn for example in examples for turn in (example.turns() if critique else example.direct_turns())]


def critique_request(principle: CritiquePrinciple) -> Turn:
    return Turn("critique_request", principle.critique)


def revision_request(principle: CritiquePrinciple) -> Turn:
    return Turn("revision_request", principle.revision)


def prompt_turns(prompt: str) -> list[Turn]:
    """The dialogue before a reply: a plain prompt is one human turn; a raw transcript
    (``\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...``, as in hh-rlhf) is split into its turns."""
    if prompt.startswith("\n\nHuman:"):
        return list(parse_raw_transcript(prompt, where="prompt"))
    return [Turn("human", prompt)]


def _conversation_text(turns) -> str:
    return "".join(f"\n\n{RAW_LABELS[t.role]}: {t.text}" for t in turns)


def choice_question(conversation: list[Turn] | tuple[Turn, ...], principle: str, responses: list[str]) -> str:
    """A multiple-choice preference question ending in "The answer is:" (options are " (A)", " (B)", ...)."""
    options = "".join(f"\n({OPTION_LETTERS[k]}) {r.strip()}" for k, r in enumerate(responses))
    return (f"Consider the following conversation between a human and an assistant:"
            f"{_conversation_text(conversation)}\n\n{principle.strip()}\nOptions:{options}\nThe answer is:")


# Chain-of-thought questions are a Human/Assistant dialogue, the layout of the paper's published chain-of-thought
# examples: the human asks the question (the conversation inside it labelled H: / A:, so that its turns cannot be
# mistaken for the outer dialogue's), the assistant reasons after "Let's think step by step:", and the answer is
# scored after a "Human:" line that reads "So the answer is:".
_COT_OPEN = "\n\nHuman: Consider the following conversation between a human (H) and an assistant (A):"
_INNER_LABELS = {"human": "H", "assistant": "A"}


def cot_question(conversation: list[Turn] | tuple[Turn, ...], principle: str, responses: list[str]) -> str:
    """A chain-of-thought preference question in the Human/Assistant format, ending in the reasoning cue."""
    dialogue = "".join(f"\n\n{_INNER_LABELS.get(t.role, RAW_LABELS[t.role])}: {t.text}" for t in conversation)
    options = "".join(f"\n({OPTION_LETTERS[k]}) {r.strip()}" for k, r in enumerate(responses))
    return f"{_COT_OPEN}{dialogue}\n\n{principle.strip()}\nOptions:{options}{cot_cue()}"


def cot_cue() -> str:
    """Where the feedback model starts reasoning (the assistant's turn of a chain-of-thought question)."""
    return "\n\nAssistant: Let's think step by step:"


def cot_answer_cue() -> str:
    """Appended after the reasoning; the options " (A)" / " (B)" are scored as its continuations."""
    return "\n\nHuman:\nSo the answer is:"


def cot_stop_strings() -> tuple[str, ...]:
    """Where generated reasoning ends: the next turn, or the model starting the answer line itself."""
    return ("\n\nHuman:", "\nHuman:", "So the answer is", "The answer is", "\n\n\n")


def mc_prompt_as_cot(prompt: str) -> str:
    """An eval-format question ("... Options: (A) ... The answer is:") as a chain-of-thought dialogue.

    The question becomes the human's turn (its inner Human: / Assistant: turns relabelled H: / A:) and the
    assistant's turn opens with the reasoning cue; the answer is scored after `cot_answer_cue()`.
    """
    body = prompt.rstrip()
    if body.endswith("The answer is:"):
        body = body[:-len("The answer is:")]
    body = body.replace("\n\nHuman:", "\n\nH:").replace("\n\nAssistant:", "\n\nA:").strip()
    return f"\n\nHuman: {body}{cot_cue()}"


def option_strings(count: int) -> list[str]:
    return [f" ({OPTION_LETTERS[k]})" for k in range(count)]


def label_fewshot(examples, principles: list[str], *, chain_of_thought: bool = False) -> str:
    """Worked labelling examples, each a full question with its answer, to put in front of a question.

    `principles[i]` is the question of example i (each example has its own principle, fixed for a run, so the
    block is the same text in front of every question and its KV cache is shared). The better reply sits at (A)
    in even-numbered examples and at (B) in odd ones, so the examples do not teach a position. With
    chain-of-thought each example is a Human/Assistant dialogue with its reasoning before the answer; the
    paper's raw chain-of-thought examples are used as published, their ``{}`` slot filled with the principle.
    """
    if len(principles) != len(examples):
        raise ValueError(f"one principle per example: got {len(principles)} principles for {len(examples)} examples")
    blocks = []
    for i, (example, principle) in enumerate(zip(examples, principles)):
        if example.raw is not None:
            blocks.append(example.raw.replace("{}", principle.strip(), 1).strip())
            continue
        responses = [example.chosen, example.rejected] if i % 2 == 0 else [example.rejected, example.chosen]
        answer = " (A)" if i % 2 == 0 else " (B)"
        if chain_of_thought:
            reasoning = example.reasoning or "The better reply is the one that is less harmful."
            blocks.append(f"{cot_question(example.conversation, principle, responses)} {reasoning.strip()}"
                          f"{cot_answer_cue()}{answer}")
        else:
            blocks.append(choice_question(example.conversation, principle, responses) + answer)
    # the paper's raw examples start with "\n\nHuman:" and chain-of-thought questions do too
    joiner = "" if chain_of_thought else "\n\n\n"
    if chain_of_thought:
        blocks = [b if b.startswith("\n\n") else "\n\n" + b for b in blocks]
    return joiner.join(blocks) + ("\n\n\n" if blocks and not chain_of_thought else "")


def pick_label_examples(constitution: Constitution, count: int, chain_of_thought: bool) -> tuple[LabelExample, ...]:
    pool = constitution.cot_label_examples if chain_of_thought and constitution.cot_label_examples \
        else constitution.label_examples
    return tuple(pool[:count])
