"""evaluate: PM scores per revision round, PM accuracy, the PPO curves' endpoints, multiple-choice evals.

Output rows (one per number): section, name, value, n, detail (JSON text). Sections:
  revision_rounds  mean PM score of the red-team responses after 0 (the first answer), 1, ... revisions
  pm               held-out accuracy of the preference model
  ppo              mean PM score and KL of the first and last PPO iterations
  mc               accuracy of each model (base / sft / ppo / any path) on each eval file; a `paper:` file
                   that is not on this machine is skipped and reported as such
Multiple-choice evals are resumable units (one shard each).
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, field

from ..data import load_mc_questions, resolve_path
from ..evals import mc_eval
from ..reporting import format_value, plot, stage_rows
from ..reward import load_reward_model
from ..rundir import RunDir
from .common import Context, run_batches

NAME = "evaluate"


@dataclass
class EvaluateConfig:
    mc_files: list[str] = field(default_factory=lambda: ["builtin:harmless_mc", "paper:438HHHEvaluations.jsonl"],
                                metadata={"unique": True})
    mc_limit: int | None = field(default=None, metadata={"ge": 1})  # first N questions of each file
    mc_models: list[str] = field(default_factory=lambda: ["base", "sft", "ppo"], metadata={"unique": True})
    reward_model: str | None = None  # default: the train_pm stage's model
    pm_batch_size: int = field(default=8, metadata={"ge": 1})
    max_batch_tokens: int = field(default=2048, metadata={"ge": 1})


def _row(section, name, value, n, **detail) -> dict:
    return {"section": section, "name": name, "value": None if value is None else float(value), "n": int(n),
            "detail": json.dumps(detail, sort_keys=True)}


def revision_round_scores(pm, revisions: list[dict], batch_size: int) -> list[dict]:
    revised = [r for r in revisions if r["revisions"]]
    rounds = max((len(r["revisions"]) for r in revised), default=0)
    rows = []
    for k in range(rounds + 1):
        members = [r for r in revised if len(r["revisions"]) >= k]
        texts = [r["response"] if k == 0 else r["revisions"][k - 1] for r in members]
        scores = pm.score([r["prompt"] for r in members], texts, batch_size=batch_size)
        mean = sum(scores) / len(scores)
        sd = (sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1)) ** 0.5
        rows.append(_row("revision_rounds", f"round {k}", mean, len(scores), stderr=sd / len(scores) ** 0.5))
    return rows


def evaluate(inputs: dict[str, list[dict]], cfg: EvaluateConfig, ctx: Context) -> list[dict]:
    """inputs: the datasets of critique_revise, train_pm (held-out pairs) and ppo (rollouts) when present."""
    rows = []
    if inputs.get("critique_revise") or inputs.get("train_pm"):
        pm = load_reward_model(ctx.model_path(cfg.reward_model, "train_pm"), device=ctx.device, dtype=ctx.dtype)
        round_rows = revision_round_scores(pm, inputs.get("critique_revise", []), cfg.pm_batch_size)
        for k, r in enumerate(round_rows):
            ctx.run.metrics.log(NAME, k, pm_score_by_round=r["value"])
        rows += round_rows
        del pm
    held = inputs.get("train_pm") or []
    decided = [h for h in held if h.get("agrees") is not None]
    if decided:
        rows.append(_row("pm", "heldout_accuracy", sum(h["agrees"] for h in decided) / len(decided), len(decided)))
    rollouts = inputs.get("ppo") or []
    if rollouts:
        for label, it in (("first", min(r["iteration"] for r in rollouts)), ("last", max(r["iteration"] for r in rollouts))):
            sel = [r for r in rollouts if r["iteration"] == it]
            rows.append(_row("ppo", f"{label}_iteration_score", sum(r["score"] for r in sel) / len(sel), len(sel),
                             iteration=it))
            rows.append(_row("ppo", f"{label}_iteration_kl", sum(r["kl"] for r in sel) / len(sel), len(sel),
                             iteration=it))

    units = [{"id": f"{model}|{spec}", "model": model, "file": spec} for model in cfg.mc_models for spec in cfg.mc_files]

    def run_unit(_, batch):
        out = []
        for unit in batch:
            path = resolve_path(unit["file"])
            if path is None or not path.is_file():
                out.append(_row("mc", unit["id"], None, 0, skipped=f"{unit['file']} is not on this machine"))
                continue
            model, tokenizer = ctx.load(unit["model"])
            questions = load_mc_questions(unit["file"], limit=cfg.mc_limit)
            result = mc_eval(model, tokenizer, questions, max_batch_tokens=cfg.max_batch_tokens,
                             overflow=ctx.prompt_overflow)
            out.append(_row("mc", unit["id"], result["accuracy"], result["n"], model=unit["model"], file=unit["file"],
                            mean_correct_prob=result["mean_correct_prob"], seconds=result["seconds"]))
        return out

    rows += run_batches(ctx, NAME, units, 1, run_unit, desc="mc evals", fingerprint=vars(cfg))
    return rows


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """PM held-out accuracy and the multiple-choice evals (the revision rounds go in critique_revise's)."""
    rows = stage_rows(run, NAME)
    mc = [r for r in rows if r["section"] == "mc"]
    pm_acc = [r for r in rows if r["section"] == "pm"]
    if not mc and not pm_acc:
        return []
    out = ["## Evaluations", ""]
    for r in pm_acc:
        out += [f"Preference model held-out accuracy: {format_value(r['value'])} (n = {r['n']}).", ""]
    if mc:
        out += ["Multiple-choice evals (`cai eval mc`: normalized log-probabilities of the option "
                "continuations; accuracy = share of questions whose correct option is the most likely):", "",
                "| model | eval file | n | accuracy | mean P(correct) | seconds |",
                "| --- | --- | --- | --- | --- | --- |"]
        done = []
        for r in mc:
            d = json.loads(r["detail"])
            model, _, spec = r["name"].partition("|")
            if r["value"] is None:
                out.append(f"| {model} | {spec} | skipped: {d.get('skipped')} | | | |")
                continue
            done.append((f"{model}\n{Path(spec).name.replace('.jsonl', '')}", r["value"]))
            out.append(f"| {model} | {spec} | {r['n']} | {format_value(r['value'])} | "
                       f"{format_value(d.get('mean_correct_prob'))} | {format_value(d.get('seconds'), 1)} |")
        if done:
            out += ["", plot(run, "mc_accuracy", lambda ax: (ax.bar(range(len(done)), [v for _, v in done]),
                                                              ax.set_xticks(range(len(done)), [k for k, _ in done],
                                                                            fontsize=6)),
                             "Multiple-choice accuracy", "", "accuracy")]
        out.append("")
    return out
