"""critique_revise: response -> n rounds of (critique, revision), a principle redrawn every round.

Per prompt: the model answers; then, for red-team prompts (`revise_kinds`), each round appends a critique
request drawn at random from the constitution, samples the critique, appends the matching revision request
and samples the revision, which becomes the reply the next round critiques. The few-shot critique/revision
examples go in front of every request (encoded once per batch, their KV cache shared). Prompts of other kinds
(helpfulness) keep their first response, as the paper mixes in plain helpful samples. Every round's text is
kept. Paper defaults: 4 rounds, temperature 1, the few-shot examples in front.

Output rows: id, prompt, kind, response, critiques [n], revisions [n], principle_ids [n], final (the last
revision, or the response when there are none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial

from ..constitution import Turn
from ..models import PromptFormat, SharedPrefix, generate
from ..prompts import critique_fewshot, critique_request, revision_request, rng_for, seed_for
from ..reporting import clip, format_value, plot, stage_rows
from ..rundir import RunDir
from .common import Context, run_batches

NAME = "critique_revise"


@dataclass
class CritiqueReviseConfig:
    model: str | None = None  # default: the run's base model
    rounds: int = field(default=4, metadata={"ge": 0})
    temperature: float = field(default=1.0, metadata={"ge": 0})  # 0: greedy
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    response_tokens: int = field(default=128, metadata={"ge": 1})
    critique_tokens: int = field(default=128, metadata={"ge": 1})
    revision_tokens: int = field(default=128, metadata={"ge": 1})
    # critique/revision examples in front (None: all of the constitution's)
    few_shot: int | None = field(default=None, metadata={"ge": 0})
    batch_size: int = field(default=8, metadata={"ge": 1})
    revise_kinds: list[str] = field(default_factory=lambda: ["red_team"])
    # auto: the tokenizer's chat template if it has one, else raw Human:/Assistant:
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def draw_principle(ctx: Context, prompt_id: str, round_index: int):
    """The critique principle for one prompt and round, drawn from (seed, prompt id, round) alone."""
    principles = ctx.constitution.critique_principles
    return principles[rng_for(ctx.seed, NAME, prompt_id, round_index).randrange(len(principles))]


def _mean_words(texts) -> float | None:
    counts = [len(t.split()) for t in texts]
    return sum(counts) / len(counts) if counts else None


def critique_revise(prompts: list[dict], cfg: CritiqueReviseConfig, ctx: Context) -> list[dict]:
    return run_batches(ctx, NAME, prompts, cfg.batch_size, make_process=partial(make_critique_revise_process, cfg),
                       desc=NAME, fingerprint=vars(cfg))


def make_critique_revise_process(cfg: CritiqueReviseConfig, ctx: Context):
    """Load the model; returns process(batch_index, prompts) -> rows with every round's critique and revision."""
    model, tokenizer = ctx.load(cfg.model)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    fewshot = critique_fewshot(ctx.constitution, cfg.few_shot)
    # the few-shot transcript opens every request: encoded once for the whole stage
    prefix = SharedPrefix(model, tokenizer, fmt.render(fewshot)) if fewshot else ""
    stop = fmt.stop_strings()

    def sample(conversations, next_role, max_new_tokens, batch_index, what):
        texts = [fmt.render(fewshot + conv, next_role=next_role) for conv in conversations]
        return generate(model, tokenizer, texts, prefix=prefix, max_new_tokens=max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(texts),
                        seed=seed_for(ctx.seed, NAME, batch_index, what), stop=stop,
                        overflow=ctx.prompt_overflow)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        conversations = [[Turn("human", row["prompt"])] for row in batch]
        responses = sample(conversations, "assistant", cfg.response_tokens, batch_index, "response")
        rows = []
        for row, conv, response in zip(batch, conversations, responses):
            conv.append(Turn("assistant", response))
            rows.append({"id": row["id"], "prompt": row["prompt"], "kind": row["kind"], "response": response,
                         "critiques": [], "revisions": [], "principle_ids": [], "final": response})
        active = [i for i, row in enumerate(batch) if row["kind"] in cfg.revise_kinds]
        for r in range(cfg.rounds if active else 0):
            principles = {i: draw_principle(ctx, batch[i]["id"], r) for i in active}
            for i in active:
                conversations[i].append(critique_request(principles[i]))
            critiques = sample([conversations[i] for i in active], "critique", cfg.critique_tokens, batch_index,
                               f"critique-{r}")
            for i, critique in zip(active, critiques):
                conversations[i] += [Turn("critique", critique), revision_request(principles[i])]
            revisions = sample([conversations[i] for i in active], "revision", cfg.revision_tokens, batch_index,
                               f"revision-{r}")
            for i, critique, revision in zip(active, critiques, revisions):
                conversations[i].append(Turn("revision", revision))
                rows[i]["critiques"].append(critique)
                rows[i]["revisions"].append(revision)
                rows[i]["principle_ids"].append(principles[i].id)
                rows[i]["final"] = revision
        revised = [rows[i] for i in active]
        ctx.run.metrics.log(NAME, batch_index, prompts=len(rows), revised=len(revised),
                            response_words=_mean_words(r["response"] for r in rows),
                            critique_words=_mean_words(c for r in revised for c in r["critiques"]),
                            revision_words=_mean_words(v for r in revised for v in r["revisions"]))
        return rows

    return process


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """Rounds and lengths, the PM score after each round (from the evaluate stage), one example."""
    revisions = stage_rows(run, NAME)
    if not revisions:
        return []
    revised = [r for r in revisions if r["revisions"]]
    out = ["## Critique and revision", "",
           f"{len(revisions)} prompts; {len(revised)} red-team prompts went through "
           f"{max((len(r['revisions']) for r in revised), default=0)} rounds of critique and revision "
           f"(principle redrawn every round), the others kept their first response.", ""]
    words = metrics.get(NAME, [])
    if words:
        def mean_of(key):
            values = [r[key] for r in words if r.get(key) is not None]
            return sum(values) / len(values) if values else None
        out += [f"Mean length in words: first answers {format_value(mean_of('response_words'), 1)}, "
                f"critiques {format_value(mean_of('critique_words'), 1)}, "
                f"revisions {format_value(mean_of('revision_words'), 1)}.", ""]
    rounds = [r for r in stage_rows(run, "evaluate") if r["section"] == "revision_rounds"]
    if rounds:
        out += ["Mean preference-model score of the responses after each revision round (higher = preferred "
                "by the PM):", "", "| round | mean PM score | stderr | n |", "| --- | --- | --- | --- |"]
        for r in rounds:
            stderr = json.loads(r["detail"]).get("stderr")
            out.append(f"| {r['name']} | {format_value(r['value'])} | {format_value(stderr)} | {r['n']} |")
        xs = list(range(len(rounds)))
        ys = [r["value"] for r in rounds]
        errs = [json.loads(r["detail"]).get("stderr") or 0.0 for r in rounds]
        out += ["", plot(run, "pm_score_by_round", lambda ax: ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3),
                         "PM score by revision round", "revision round (0 = first answer)", "mean PM score"), ""]
    if revised:
        ex = revised[0]
        out += ["Example:", "", f"- **Prompt:** {clip(ex['prompt'])}", f"- **First answer:** {clip(ex['response'])}"]
        for k, (c, v, p) in enumerate(zip(ex["critiques"], ex["revisions"], ex["principle_ids"]), 1):
            out += [f"- **Critique {k}** (`{p}`): {clip(c)}", f"- **Revision {k}:** {clip(v)}"]
        out.append("")
    return out
