"""label: AI preference labels. The feedback model answers "which response is better? (A) ... (B) ...".

Every pair is one comparison of `cai.feedback.Comparer`: `principles_per_comparison` choice principles drawn for
the pair (the paper: one, so that the ensemble is over the data set), each asked in both orders or in one drawn
order (`both_orders`), with the few-shot labelling examples in front (each with its own principle, fixed for the
run, so their KV cache is shared), optionally with chain-of-thought in the Human/Assistant format and the answer
clamped to `clamp`. The soft label is the probability of " (A)" vs " (B)" (`cai.scoring`: prompt encoded once,
options share its KV cache, LM head only at option tokens), averaged over orders and principles.

Cost: principles_per_comparison x (2 if both_orders else 1) scored questions per pair; with chain-of-thought
each is also a generation of up to cot_max_new_tokens tokens. The paper preset (1 principle, 1 order) asks one
question per pair; 4 principles in both orders ask 8, eight times the labelling time.

Output rows: the pair (id, prompt, kind, response_a, response_b) and p_a (probability that response_a is
the better one), principle_ids, principle_probs (p_a per principle), first_position_prob (mean probability
given to whichever response was shown as (A): 0.5 = no position bias), reasoning (chain-of-thought texts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..feedback import CompareSettings, Comparer
from ..prompts import pick_label_examples, seed_for
from ..reporting import plot, stage_rows
from ..rundir import RunDir
from .common import Context, run_batches

NAME = "label"


def _low_high(pair: list[float]) -> str | None:
    return None if pair[0] <= pair[1] else "expected [low, high] with low <= high"


@dataclass
class LabelConfig:
    model: str | None = None  # the feedback model; default: the run's base model
    # principles drawn per pair (paper: 1; more = an ensemble per pair, each one more question per order)
    principles_per_comparison: int = field(default=1, metadata={"ge": 1})
    few_shot: int | None = field(default=None, metadata={"ge": 0})  # labelling examples in front (None: all)
    both_orders: bool = True  # ask with the responses swapped too and average (x2 questions)
    chain_of_thought: bool = False
    cot_max_new_tokens: int = field(default=96, metadata={"ge": 1})
    cot_temperature: float = field(default=0.0, metadata={"ge": 0})  # 0: greedy reasoning
    # chain-of-thought labels are clamped to [low, high] (the paper: 0.4-0.6)
    clamp: list[float] | None = field(default_factory=lambda: [0.4, 0.6],
                                      metadata={"len": 2, "ge": 0, "le": 1, "check": _low_high})
    batch_size: int = field(default=8, metadata={"ge": 1})  # pairs per batch (= per shard)
    max_batch_tokens: int = field(default=2048, metadata={"ge": 1})


def settings_of(cfg: LabelConfig, overflow: str = "truncate-left") -> CompareSettings:
    return CompareSettings(principles_per_comparison=cfg.principles_per_comparison, both_orders=cfg.both_orders,
                           chain_of_thought=cfg.chain_of_thought, cot_max_new_tokens=cfg.cot_max_new_tokens,
                           cot_temperature=cfg.cot_temperature, clamp=tuple(cfg.clamp) if cfg.clamp else None,
                           max_batch_tokens=cfg.max_batch_tokens, overflow=overflow)


def make_comparer(cfg: LabelConfig, ctx: Context, model, tokenizer) -> Comparer:
    count = len(ctx.constitution.label_examples) if cfg.few_shot is None else cfg.few_shot
    examples = pick_label_examples(ctx.constitution, count, cfg.chain_of_thought)
    return Comparer(model, tokenizer, ctx.constitution.choice_principles, examples,
                    settings_of(cfg, ctx.prompt_overflow), seed=ctx.seed, stage=NAME)


def label(pairs: list[dict], cfg: LabelConfig, ctx: Context) -> list[dict]:
    return run_batches(ctx, NAME, pairs, cfg.batch_size, make_process=partial(make_label_process, cfg), desc=NAME,
                       fingerprint=vars(cfg))


def make_label_process(cfg: LabelConfig, ctx: Context):
    """Load the feedback model; returns process(batch_index, pairs) -> labelled rows (one per pair)."""
    model, tokenizer = ctx.load(cfg.model)
    comparer = make_comparer(cfg, ctx, model, tokenizer)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        results = comparer.compare(batch, seed_for(ctx.seed, NAME, batch_index))
        rows = [{"id": row["id"], "prompt": row["prompt"], "kind": row["kind"], "response_a": row["response_a"],
                 "response_b": row["response_b"], **result} for row, result in zip(batch, results)]
        ctx.run.metrics.log(NAME, batch_index, mean_p_a=sum(r["p_a"] for r in rows) / len(rows),
                            first_position_prob=sum(r["first_position_prob"] for r in rows) / len(rows),
                            questions=len(batch) * settings_of(cfg).questions_per_pair())
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
    questions = sum(r.get("questions", 0) for r in metrics.get(NAME, []))
    asked = f" ({questions} questions asked)" if questions else ""
    return ["## AI preference labels", "", sample_note +
            f"{len(labels)} pairs labelled by the feedback model with {len(labels[0]['principle_ids'])} "
            f"principle(s) each{asked}, {len(principles)} distinct principles used. Mean P(response A better) = "
            f"{sum(p) / len(p):.3f}; share of pairs with A preferred = {sum(x > 0.5 for x in p) / len(p):.3f}; "
            f"mean probability given to whichever response was shown first = {sum(first) / len(first):.3f} "
            f"(0.5 = no position bias).", "",
            plot(run, "label_hist", lambda ax: ax.hist(p, bins=20, range=(0, 1)), "Soft labels",
                 "P(response A is better)", "pairs"), ""]
