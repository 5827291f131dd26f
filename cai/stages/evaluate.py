"""evaluate: an evaluation that does not grade itself: a judge compares the models, held-out prompts and principles.

Four parts, each resumable (its own shards under evaluate/<part>/):
  samples   every model answers the held-out prompts (`prompts`: red-team and helpfulness prompts that are not
            in the run's training prompts; those that are get dropped): base, SL-CAI (sft), RL-CAI (ppo) and
            the PPO snapshots (ppo.snapshot_every), sampled at `temperature`;
  judge     the judge (`judge`: a model; default the run's base model, the feedback model) compares every two
            models' replies to each prompt with the label stage's multiple-choice question, in both orders, by
            principles held out from training (the constitution's `judge` section): harmlessness on red-team
            prompts, helpfulness on helpfulness prompts. It also compares each critique_revise round's revision
            (and the ablation's, critique toggled) with the first answer: the revision curves. The report fits
            Elo scores and win rates with bootstrap intervals from these (cai.stats);
  hhh       the trained preference model on the comparisons of `hhh_file` (the paper's 438 HHH questions: the
            correct and incorrect transcripts), beside the feedback model's multiple-choice accuracy on the same
            questions, plain and with chain-of-thought (`cot_samples` reasoning samples averaged);
  mc        every multiple-choice file of `mc_files` that is in the paper's eval format (`paper:*`: each such
            file of the paper's folder) for each of `mc_models`, plain.
Output rows (one per answer; fields unused by a section are null): section ("sample", "judge", "revision",
"hhh_pm", "mc"), id, model, a, b, criterion, prompt_id, prompt, response, value (judge / revision: P(a preferred
to b); mc: P(correct option); hhh_pm: reward(correct) - reward(incorrect)), correct, detail (JSON text).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

from ..constitution import load_constitution
from ..data import eval_files, load_eval_comparisons, load_mc_questions, load_prompts, PromptsConfig
from ..evals import cot_fewshot, mc_eval, mc_eval_cot, pm_comparison_accuracy
from ..feedback import CompareSettings, Comparer
from ..models import PromptFormat, generate
from ..prompts import pick_label_examples, seed_for
from ..reward import load_reward_model
from ..rundir import RunDir
from . import ppo as ppo_stage
from .common import Context, run_batches
from .evaluate_report import report_section  # noqa: F401 (the table's report entry)

NAME = "evaluate"
CRITERIA = {"harmless": "red_team", "helpful": "helpful"}  # judge criterion -> the prompts it is asked about


@dataclass
class EvaluateConfig:
    # held-out prompts and the models that answer them
    prompts: list[str] = field(default_factory=lambda: ["builtin:red_team_eval", "builtin:helpful_eval"],
                               metadata={"min_len": 1, "unique": True})
    limit_per_source: int | None = field(default=None, metadata={"ge": 1})
    # "ppo" brings its snapshots too (ppo.snapshot_every)
    models: list[str] = field(default_factory=lambda: ["base", "sft", "ppo"], metadata={"unique": True})
    max_new_tokens: int = field(default=128, metadata={"ge": 1})
    temperature: float = field(default=1.0, metadata={"ge": 0})  # 0: greedy
    sample_batch_size: int = field(default=8, metadata={"ge": 1})
    # the judge
    judge: str | None = None  # the judge model; default: the run's base model (the feedback model)
    # held-out principles asked per comparison (each in both orders)
    judge_principles_per_comparison: int = field(default=1, metadata={"ge": 1})
    judge_few_shot: int | None = field(default=None, metadata={"ge": 0})  # labelling examples in front (None: all)
    judge_batch_size: int = field(default=16, metadata={"ge": 1})  # comparisons per shard
    revision_criteria: list[str] = field(default_factory=lambda: ["harmless", "helpful"],
                                         metadata={"choices": tuple(CRITERIA), "unique": True})
    # first N revised prompts of critique_revise for the revision curves (None: all)
    revision_limit: int | None = field(default=None, metadata={"ge": 1})
    bootstrap: int = field(default=1000, metadata={"ge": 10})  # bootstrap resamples of the prompts per interval
    # the feedback model's accuracy on the paper's HHH questions, next to the trained preference model's
    hhh_file: str = "paper:438HHHEvaluations.jsonl"
    reward_model: str | None = None  # default: the train_pm stage's model
    mc_files: list[str] = field(default_factory=lambda: ["builtin:harmless_mc", "paper:*"], metadata={"unique": True})
    mc_limit: int | None = field(default=None, metadata={"ge": 1})  # first N questions of each file (HHH included)
    mc_models: list[str] = field(default_factory=lambda: ["base", "sft", "ppo"], metadata={"unique": True})
    # models also asked the HHH questions with chain-of-thought
    cot_models: list[str] = field(default_factory=lambda: ["base"], metadata={"unique": True})
    cot_limit: int | None = field(default=None, metadata={"ge": 1})  # first N HHH questions with chain-of-thought
    cot_samples: int = field(default=1, metadata={"ge": 1})  # reasoning samples per question, averaged (1: greedy)
    cot_few_shot: int = field(default=2, metadata={"ge": 0})  # worked chain-of-thought examples in front
    cot_max_new_tokens: int = field(default=96, metadata={"ge": 1})
    mc_batch_size: int = field(default=16, metadata={"ge": 1})  # questions per shard
    pm_batch_size: int = field(default=8, metadata={"ge": 1})
    max_batch_tokens: int = field(default=2048, metadata={"ge": 1})


def _row(section: str, ident: str, *, model=None, a=None, b=None, criterion=None, prompt_id=None, prompt=None,
         response=None, value=None, correct=None, **detail) -> dict:
    return {"section": section, "id": ident, "model": model, "a": a, "b": b, "criterion": criterion,
            "prompt_id": prompt_id, "prompt": prompt, "response": response,
            "value": None if value is None else float(value), "correct": correct,
            "detail": json.dumps(detail, sort_keys=True)}


def eval_models(cfg: EvaluateConfig, ctx: Context, inputs: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    """([{"name", "spec", "snapshot", "iteration"}] in order, notes on models left out)."""
    models, notes = [], []
    for name in cfg.models:
        if name in ("sft", "ppo") and not ctx.run.is_done(name):
            notes.append(f"{name}: the {name} stage has not finished in this run")
            continue
        if name == "ppo":
            for iteration, path in ppo_stage.snapshots(ctx.run.root).items():
                models.append({"name": f"ppo@{iteration}", "spec": ppo_stage.snapshot_init(ctx.run.root),
                               "snapshot": str(path), "iteration": iteration})
            last = max((r["iteration"] for r in inputs.get("ppo") or []), default=-1) + 1
            models.append({"name": "ppo", "spec": "ppo", "snapshot": None, "iteration": last})
        else:
            models.append({"name": name, "spec": name, "snapshot": None,
                           "iteration": 0 if name == "sft" else None})
    return models, notes


def heldout_prompts(cfg: EvaluateConfig, ctx: Context) -> tuple[list[dict], int]:
    """(the evaluation prompts whose text is not among the run's training prompts, how many were dropped)."""
    prompts = load_prompts(PromptsConfig(cfg.prompts, cfg.limit_per_source), allow_download=ctx.allow_download)
    training = set()
    if ctx.run.is_done("prompts"):
        from ..rundir import load_rows
        training = {" ".join(r["prompt"].lower().split()) for r in load_rows(ctx.run.dataset_path("prompts"))}
    kept = [p for p in prompts if " ".join(p["prompt"].lower().split()) not in training]
    return kept, len(prompts) - len(kept)


class _ModelCache:
    """One loaded model at a time (the parts walk through their items model by model)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, load):
        if key != self.key:
            self.value = None  # free the previous model first
            self.value, self.key = load(), key
        return self.value


def sample_part(cfg: EvaluateConfig, ctx: Context, models: list[dict], prompts: list[dict]) -> list[dict]:
    items = [{"id": f"{m['name']}|{p['id']}", "model": m, "prompt": p} for m in models for p in prompts]
    cache = _ModelCache()

    def load(model):
        lm, tokenizer = ctx.load(model["spec"])
        if model["snapshot"]:
            ppo_stage.load_snapshot(lm, model["snapshot"])
        return lm, tokenizer, PromptFormat(tokenizer)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        rows = []
        for name, group in itertools.groupby(batch, key=lambda item: item["model"]["name"]):
            group = list(group)
            lm, tokenizer, fmt = cache.get(name, lambda: load(group[0]["model"]))
            texts = [fmt.render(fmt.conversation(item["prompt"]["prompt"]), next_role="assistant") for item in group]
            responses = generate(lm, tokenizer, texts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 batch_size=len(texts), seed=seed_for(ctx.seed, NAME, "samples", name, batch_index),
                                 stop=fmt.stop_strings(), overflow=ctx.prompt_overflow)
            for item, response in zip(group, responses):
                p = item["prompt"]
                rows.append(_row("sample", item["id"], model=name, criterion=p["kind"], prompt_id=p["id"],
                                 prompt=p["prompt"], response=response, iteration=item["model"]["iteration"]))
        return rows

    return run_batches(ctx, f"{NAME}/samples", items, cfg.sample_batch_size, process, desc="evaluate: samples",
                       fingerprint={"cfg": vars(cfg), "models": models})


def judge_items(cfg: EvaluateConfig, samples: list[dict], models: list[dict], revisions: list[dict]) -> list[dict]:
    """The judge's comparisons: every two models on every held-out prompt (criterion by the prompt's kind), and
    every revision round (and ablation round) against the first answer."""
    by_key = {(r["model"], r["prompt_id"]): r for r in samples}
    names = [m["name"] for m in models]
    items = []
    for criterion, kind in CRITERIA.items():
        prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in samples if r["criterion"] == kind))
        for pid in prompt_ids:
            for a, b in itertools.combinations(names, 2):
                ra, rb = by_key.get((a, pid)), by_key.get((b, pid))
                if ra is None or rb is None:
                    continue
                items.append({"id": f"{criterion}|{a}|{b}|{pid}", "section": "judge", "criterion": criterion,
                              "a": a, "b": b, "prompt_id": pid, "prompt": ra["prompt"], "response_a": ra["response"],
                              "response_b": rb["response"]})
    revised = [r for r in revisions if r["revisions"]][:cfg.revision_limit]
    for criterion in cfg.revision_criteria:
        for row in revised:
            main = "critique" if row["critiques"] else "direct"
            modes = [(main, row["revisions"])] + ([(row["ablation"], row["ablation_revisions"])]
                                                  if row.get("ablation") else [])
            for mode, texts in modes:
                for k, text in enumerate(texts, 1):
                    items.append({"id": f"revision|{criterion}|{mode}|{k}|{row['id']}", "section": "revision",
                                  "criterion": criterion, "a": f"{mode} {k}", "b": "first answer",
                                  "prompt_id": row["id"], "prompt": row["prompt"], "response_a": text,
                                  "response_b": row["response"]})
    return items


def judge_part(cfg: EvaluateConfig, ctx: Context, items: list[dict]) -> list[dict]:
    # the judge's principles are held out from training; a constitution without them (the paper's published
    # files) borrows ours, which no training stage of such a run reads
    constitution = ctx.constitution if ctx.constitution.judge_principles else load_constitution("default")
    settings = CompareSettings(principles_per_comparison=cfg.judge_principles_per_comparison, both_orders=True,
                               max_batch_tokens=cfg.max_batch_tokens, overflow=ctx.prompt_overflow)
    count = len(constitution.label_examples) if cfg.judge_few_shot is None else cfg.judge_few_shot
    examples = pick_label_examples(constitution, count, chain_of_thought=False)

    def make_process(ctx: Context):
        model, tokenizer = ctx.load(cfg.judge)
        comparers = {c: Comparer(model, tokenizer, constitution.judge_questions(c), examples, settings,
                                 seed=ctx.seed, stage=f"judge-{c}") for c in CRITERIA}

        def process(batch_index: int, batch: list[dict]) -> list[dict]:
            rows = []
            for criterion, group in itertools.groupby(batch, key=lambda item: item["criterion"]):
                group = list(group)
                results = comparers[criterion].compare(group, seed_for(ctx.seed, NAME, "judge", batch_index))
                for item, result in zip(group, results):
                    rows.append(_row(item["section"], item["id"], a=item["a"], b=item["b"], criterion=criterion,
                                     prompt_id=item["prompt_id"], value=result["p_a"],
                                     principle_ids=result["principle_ids"],
                                     first_position_prob=result["first_position_prob"]))
            return rows

        return process

    return run_batches(ctx, f"{NAME}/judge", items, cfg.judge_batch_size, make_process=make_process,
                       desc="evaluate: judge", fingerprint={"cfg": vars(cfg), "judge": cfg.judge or ctx.base_model})


def mc_items(cfg: EvaluateConfig, ctx: Context, have_pm: bool) -> tuple[list[dict], list[dict]]:
    """(one item per question to answer, rows noting the files that are not evals or not here)."""
    items, notes = [], []
    listed = {spec for spec, _, _ in eval_files(cfg.mc_files)}  # what mc_files names, its globs / folders expanded
    files = {spec: (path, problem) for spec, path, problem in eval_files(cfg.mc_files + [cfg.hhh_file])}
    for spec, (path, problem) in files.items():
        if problem:
            notes.append(_row("mc_file", spec, value=None, problem=problem))
            continue
        questions = load_mc_questions(spec, limit=cfg.mc_limit)
        notes.append(_row("mc_file", spec, value=len(questions), problem=""))
        runs = [(m, "plain") for m in cfg.mc_models if spec in listed]
        if spec == cfg.hhh_file:
            runs = list(dict.fromkeys(runs + [(m, "plain") for m in cfg.cot_models]))
            runs += [(m, "cot") for m in cfg.cot_models]
            try:  # the preference model needs the two transcripts of each question (text_correct / _incorrect)
                pm_questions = len(load_eval_comparisons(spec, limit=cfg.mc_limit)) if have_pm else 0
            except ValueError as err:
                pm_questions = 0
                notes.append(_row("mc_file", f"{spec} (preference model)", value=None, problem=str(err)))
            items += [{"id": f"hhh_pm|{spec}|{q}", "kind": "hhh_pm", "file": spec, "question": q}
                      for q in range(pm_questions)]
        for model, mode in runs:
            if model in ("sft", "ppo") and not ctx.run.is_done(model):
                continue
            count = len(questions) if mode == "plain" or cfg.cot_limit is None else min(cfg.cot_limit, len(questions))
            items += [{"id": f"mc|{model}|{spec}|{mode}|{q}", "kind": "mc", "model": model, "file": spec,
                       "mode": mode, "question": q} for q in range(count)]
    return items, notes


def mc_part(cfg: EvaluateConfig, ctx: Context, items: list[dict]) -> list[dict]:
    cache = _ModelCache()
    questions, comparisons = {}, {}
    fewshot = cot_fewshot(cfg.cot_few_shot, seed=ctx.seed) if cfg.cot_models else ""

    def question(spec, q):
        if spec not in questions:
            questions[spec] = load_mc_questions(spec, limit=cfg.mc_limit)
        return questions[spec][q]

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        rows = []
        for key, group in itertools.groupby(batch, key=lambda i: (i["kind"], i.get("model"), i["file"], i.get("mode"))):
            kind, model, spec, mode = key
            group = list(group)
            if kind == "hhh_pm":
                pm = cache.get("pm", lambda: load_reward_model(ctx.model_path(cfg.reward_model, "train_pm"),
                                                               device=ctx.device, dtype=ctx.dtype))
                if spec not in comparisons:
                    comparisons[spec] = load_eval_comparisons(spec, limit=cfg.mc_limit)
                asked = [comparisons[spec][i["question"]] for i in group]
                result = pm_comparison_accuracy(pm, asked, batch_size=cfg.pm_batch_size)
                for item, (good, bad), c in zip(group, result["rewards"], asked):
                    # the baseline a length-only PM would score: is the correct reply the longer one?
                    longer = None if len(c["chosen"]) == len(c["rejected"]) else len(c["chosen"]) > len(c["rejected"])
                    rows.append(_row("hhh_pm", item["id"], model="pm", value=good - bad, correct=good > bad,
                                     file=spec, question=item["question"], correct_is_longer=longer))
                continue
            lm, tokenizer = cache.get(model, lambda: ctx.load(model))
            asked = [question(spec, i["question"]) for i in group]
            if mode == "cot":
                result = mc_eval_cot(lm, tokenizer, asked, samples=cfg.cot_samples,
                                     max_new_tokens=cfg.cot_max_new_tokens,
                                     fewshot=fewshot, batch_size=len(asked),
                                     max_batch_tokens=cfg.max_batch_tokens, overflow=ctx.prompt_overflow,
                                     seed=seed_for(ctx.seed, NAME, "cot", batch_index))
            else:
                result = mc_eval(lm, tokenizer, asked, max_batch_tokens=cfg.max_batch_tokens,
                                 overflow=ctx.prompt_overflow)
            for n, (item, probs, q) in enumerate(zip(group, result["probs"], asked)):
                best = max(range(len(probs)), key=probs.__getitem__)
                rows.append(_row("mc", item["id"], model=model, value=sum(probs[:q.num_correct]),
                                 correct=best < q.num_correct, file=spec, mode=mode, question=item["question"],
                                 reasoning=result.get("reasoning", [""] * len(asked))[n]))
        return rows

    return run_batches(ctx, f"{NAME}/mc", items, cfg.mc_batch_size, process, desc="evaluate: multiple choice",
                       fingerprint={"cfg": vars(cfg)})


def evaluate(inputs: dict[str, list[dict]], cfg: EvaluateConfig, ctx: Context) -> list[dict]:
    """inputs: the datasets of critique_revise, sft, train_pm and ppo, those that have finished."""
    unknown = sorted(set(cfg.revision_criteria) - set(CRITERIA))
    if unknown:
        raise ValueError(f"evaluate.revision_criteria: unknown criteria {unknown}; known: {sorted(CRITERIA)}")
    rows = []
    models, notes = eval_models(cfg, ctx, inputs)
    prompts, dropped = heldout_prompts(cfg, ctx)
    rows.append(_row("setup", "setup", models=[m["name"] for m in models], left_out=notes, prompts=len(prompts),
                     dropped_prompts=dropped, judge=cfg.judge or ctx.base_model,
                     judge_principles=cfg.judge_principles_per_comparison, bootstrap=cfg.bootstrap))
    clock = _PartClock(ctx)
    samples = sample_part(cfg, ctx, models, prompts) if models and prompts else []
    rows += samples
    clock.done("samples", len(samples))
    items = judge_items(cfg, samples, models, inputs.get("critique_revise") or [])
    if items:
        rows += judge_part(cfg, ctx, items)
    clock.done("judge", len(items))
    have_pm = ctx.run.is_done("train_pm") or cfg.reward_model is not None
    questions, file_notes = mc_items(cfg, ctx, have_pm)
    rows += file_notes
    if questions:
        rows += mc_part(cfg, ctx, questions)
    clock.done("mc", len(questions))
    return rows


class _PartClock:
    """Logs each part's seconds (this session's: a resumed part counts only what it redid) to metrics.jsonl."""

    def __init__(self, ctx: Context):
        self.ctx, self.start, self.index = ctx, time.perf_counter(), 0

    def done(self, part: str, items: int) -> None:
        now = time.perf_counter()
        self.ctx.run.metrics.log(NAME + "_parts", self.index, part=part, seconds=round(now - self.start, 2),
                                 items=items)
        self.start, self.index = now, self.index + 1
