"""label: AI preference labels. The feedback model answers "which response is better? (A) ... (B) ...".

For every pair, `principles` choice principles are drawn at random (from the seed and the pair's id, so a
resumed run draws the same ones). Each principle makes one multiple-choice question, with the few-shot
labelling examples in front; the soft label is the normalized probability of the continuation " (A)" vs
" (B)" (`cai.scoring`: prompt encoded once, options share its KV cache, LM head only at option tokens).
Options:
  * both_orders: ask again with the responses swapped and average, which cancels position bias;
  * chain_of_thought: the model first writes its reasoning ("Let's think step by step:"), then the answer is
    scored after it; those probabilities are clamped to `clamp` (the paper: 0.4-0.6), since reasoning makes
    the model over-confident;
  * the ensemble: p_a is the mean over the drawn principles.
Without chain-of-thought, the few-shot examples are written with the constitution's first choice principle,
so they are the same text for every question and are encoded once per batch.

Output rows: the pair (id, prompt, kind, response_a, response_b) and p_a (probability that response_a is
the better one), principle_ids, principle_probs (p_a per principle), first_position_prob (mean probability
given to whichever response was shown as (A): 0.5 = no position bias), reasoning (chain-of-thought texts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..constitution import Turn
from ..models import SharedPrefix, generate
from ..prompts import (choice_question, cot_answer_cue, cot_cue, label_fewshot, option_strings,
                       pick_label_examples, rng_for, seed_for)
from ..reporting import plot, stage_rows
from ..rundir import RunDir
from ..scoring import score_options
from .common import Context, run_batches

NAME = "label"
_ANSWER_CUE = "The answer is:"


def _low_high(pair: list[float]) -> str | None:
    return None if pair[0] <= pair[1] else "expected [low, high] with low <= high"


@dataclass
class LabelConfig:
    model: str | None = None  # the feedback model; default: the run's base model
    principles: int = field(default=1, metadata={"ge": 1})  # principles drawn per pair (ensemble size)
    few_shot: int | None = field(default=None, metadata={"ge": 0})  # labelling examples in front (None: all)
    both_orders: bool = True
    chain_of_thought: bool = False
    cot_max_new_tokens: int = field(default=96, metadata={"ge": 1})
    cot_temperature: float = field(default=0.0, metadata={"ge": 0})  # 0: greedy reasoning
    # chain-of-thought labels are clamped to [low, high] (the paper: 0.4-0.6)
    clamp: list[float] | None = field(default_factory=lambda: [0.4, 0.6],
                                      metadata={"len": 2, "ge": 0, "le": 1, "check": _low_high})
    batch_size: int = field(default=8, metadata={"ge": 1})  # pairs per batch (= per shard)
    max_batch_tokens: int = field(default=2048, metadata={"ge": 1})


def draw_principles(ctx: Context, pair_id: str, count: int) -> list:
    principles = ctx.constitution.choice_principles
    picks = rng_for(ctx.seed, NAME, pair_id).sample(range(len(principles)), min(count, len(principles)))
    return [principles[j] for j in picks]


def build_questions(ctx: Context, batch: list[dict], cfg: LabelConfig) -> list[dict]:
    """One multiple-choice question per (pair, drawn principle, order of the two responses)."""
    questions = []
    for i, row in enumerate(batch):
        for principle in draw_principles(ctx, row["id"], cfg.principles):
            for swapped in ((False, True) if cfg.both_orders else (False,)):
                responses = [row["response_b"], row["response_a"]] if swapped else [row["response_a"], row["response_b"]]
                questions.append({"pair": i, "principle": principle, "swapped": swapped,
                                  "text": choice_question([Turn("human", row["prompt"])], principle.text, responses)})
    return questions


def pair_labels(batch: list[dict], questions: list[dict], probs, reasoning) -> list[dict]:
    """Average each pair's answers: over the two orders per principle, then over principles."""
    rows = []
    for i, row in enumerate(batch):
        per_principle, first_position, thoughts = {}, [], []
        for q, p, thought in zip(questions, probs, reasoning):
            if q["pair"] != i:
                continue
            per_principle.setdefault(q["principle"].id, []).append(p[1] if q["swapped"] else p[0])
            first_position.append(p[0])
            if thought:
                thoughts.append(thought)
        principle_probs = [sum(v) / len(v) for v in per_principle.values()]
        rows.append({"id": row["id"], "prompt": row["prompt"], "kind": row["kind"], "response_a": row["response_a"],
                     "response_b": row["response_b"], "p_a": sum(principle_probs) / len(principle_probs),
                     "principle_ids": list(per_principle), "principle_probs": principle_probs,
                     "first_position_prob": sum(first_position) / len(first_position), "reasoning": thoughts})
    return rows


def label(pairs: list[dict], cfg: LabelConfig, ctx: Context) -> list[dict]:
    return run_batches(ctx, NAME, pairs, cfg.batch_size, make_process=partial(make_label_process, cfg), desc=NAME,
                       fingerprint=vars(cfg))


def make_label_process(cfg: LabelConfig, ctx: Context):
    """Load the feedback model; returns process(batch_index, pairs) -> labelled rows (one per pair)."""
    model, tokenizer = ctx.load(cfg.model)
    count = len(ctx.constitution.label_examples) if cfg.few_shot is None else cfg.few_shot
    examples = pick_label_examples(ctx.constitution, count, cfg.chain_of_thought)
    options = option_strings(2)
    # without chain-of-thought the examples are the same text in front of every question: encoded once
    shared = None
    if examples and not cfg.chain_of_thought:
        shared = SharedPrefix(model, tokenizer, label_fewshot(examples, ctx.constitution.choice_principles[0].text))
    clamp = tuple(cfg.clamp) if cfg.chain_of_thought and cfg.clamp else None

    def with_reasoning(batch_index: int, questions: list[dict]):
        """Chain-of-thought: per principle, generate the reasoning, then score the answer after it."""
        probs, reasoning = [None] * len(questions), [""] * len(questions)
        by_principle = {}
        for n, q in enumerate(questions):
            by_principle.setdefault(q["principle"].id, []).append(n)
        for principle_id, members in by_principle.items():
            prefix = label_fewshot(examples, questions[members[0]]["principle"].text, chain_of_thought=True)
            asks = [prefix + questions[n]["text"][:-len(_ANSWER_CUE)] + cot_cue() for n in members]
            thoughts = generate(model, tokenizer, asks, prefix=prefix, max_new_tokens=cfg.cot_max_new_tokens,
                                temperature=cfg.cot_temperature, batch_size=len(asks),
                                seed=seed_for(ctx.seed, NAME, batch_index, principle_id),
                                stop=("So the answer", "The answer is", "\n\n\n", "Consider the following"),
                                overflow=ctx.prompt_overflow)
            scored = score_options(model, tokenizer, [a + " " + t + cot_answer_cue() for a, t in zip(asks, thoughts)],
                                   [options] * len(asks), prefix=prefix, clamp=clamp,
                                   max_batch_tokens=cfg.max_batch_tokens, overflow=ctx.prompt_overflow)
            for n, thought, p in zip(members, thoughts, scored.probs):
                reasoning[n], probs[n] = thought, p
        return probs, reasoning

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        questions = build_questions(ctx, batch, cfg)
        if cfg.chain_of_thought:
            probs, reasoning = with_reasoning(batch_index, questions)
        else:
            head = shared.text if shared is not None else ""
            probs = score_options(model, tokenizer, [head + q["text"] for q in questions], [options] * len(questions),
                                  prefix=shared or "", max_batch_tokens=cfg.max_batch_tokens,
                                  overflow=ctx.prompt_overflow).probs
            reasoning = [""] * len(questions)
        rows = pair_labels(batch, questions, probs, reasoning)
        ctx.run.metrics.log(NAME, batch_index, mean_p_a=sum(r["p_a"] for r in rows) / len(rows),
                            first_position_prob=sum(r["first_position_prob"] for r in rows) / len(rows))
        return rows

    return process


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """How the pairs were sampled (sample_pairs' metrics), the labels' distribution and position bias."""
    labels = stage_rows(run, NAME)
    if not labels:
        return []
    p = [r["p_a"] for r in labels]
    first = [r["first_position_prob"] for r in labels]
    principles = sorted({pid for r in labels for pid in r["principle_ids"]})
    sampled = metrics.get("sample_pairs", [])
    sample_note = ""
    if sampled:
        n = sum(r["pairs"] for r in sampled)
        sample_note = (f"The pairs were sampled from the SL model (mean response length "
                       f"{sum(r['response_words'] * r['pairs'] for r in sampled) / n:.1f} words; "
                       f"{sum(r['identical_pairs'] for r in sampled)} pairs with two identical responses). ")
    return ["## AI preference labels", "", sample_note +
            f"{len(labels)} pairs labelled by the feedback model with {len(labels[0]['principle_ids'])} "
            f"principle(s) each ({len(principles)} distinct principles used). Mean P(response A better) = "
            f"{sum(p) / len(p):.3f}; share of pairs with A preferred = {sum(x > 0.5 for x in p) / len(p):.3f}; "
            f"mean probability given to whichever response was shown first = {sum(first) / len(first):.3f} "
            f"(0.5 = no position bias).", "",
            plot(run, "label_hist", lambda ax: ax.hist(p, bins=20, range=(0, 1)), "Soft labels",
                 "P(response A is better)", "pairs"), ""]
