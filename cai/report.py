"""report.md + PNG plots (matplotlib, Agg backend) from a run folder's datasets and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .rundir import RunDir, atomic_write_text, load_rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot(run: RunDir, name: str, draw, title: str, xlabel: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run.root / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"![{title}](plots/{name}.png)"


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def _rows(run: RunDir, stage: str) -> list[dict]:
    return load_rows(run.dataset_path(stage)) if run.is_done(stage) else []


def _done_info(run: RunDir, stage: str) -> dict:
    path = run.root / stage / "DONE"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(run: RunDir, config) -> Path:
    from .config import STAGES

    metrics = run.metrics.read()
    by_stage = {}
    for record in metrics:
        by_stage.setdefault(record["stage"], []).append(record)
    out = [f"# CAI run: {config.name}", "",
           f"Base model `{config.model}`, constitution `{config.constitution}`, seed {config.seed}. "
           f"Run folder `{run.root}`.", ""]

    out += ["## Stages", "", "| stage | rows | seconds | resumed |", "| --- | --- | --- | --- |"]
    total = 0.0
    for stage in STAGES:
        info = _done_info(run, stage)
        if info:
            total += info.get("seconds", 0.0)
            out.append(f"| {stage} | {info.get('rows')} | {_fmt(info.get('seconds'), 1)} | "
                       f"{'yes' if info.get('resumed') else 'no'} |")
        else:
            out.append(f"| {stage} | not run | | |")
    out += ["", f"Total stage time: {total:.1f} s.", ""]

    evaluation = _rows(run, "evaluate")

    # --- critique / revision
    revisions = _rows(run, "critique_revise")
    if revisions:
        revised = [r for r in revisions if r["revisions"]]
        out += ["## Critique and revision", "",
                f"{len(revisions)} prompts; {len(revised)} red-team prompts went through "
                f"{max((len(r['revisions']) for r in revised), default=0)} rounds of critique and revision "
                f"(principle redrawn every round), the others kept their first response.", ""]
        rounds = [r for r in evaluation if r["section"] == "revision_rounds"]
        if rounds:
            out += ["Mean preference-model score of the responses after each revision round (higher = preferred "
                    "by the PM):", "", "| round | mean PM score | stderr | n |", "| --- | --- | --- | --- |"]
            for r in rounds:
                out.append(f"| {r['name']} | {_fmt(r['value'])} | {_fmt(json.loads(r['detail']).get('stderr'))} "
                           f"| {r['n']} |")
            xs = list(range(len(rounds)))
            ys = [r["value"] for r in rounds]
            errs = [json.loads(r["detail"]).get("stderr") or 0.0 for r in rounds]
            out += ["", _plot(run, "pm_score_by_round", lambda ax: ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3),
                              "PM score by revision round", "revision round (0 = first answer)", "mean PM score"), ""]
        if revised:
            ex = revised[0]
            out += ["Example:", "", f"- **Prompt:** {_clip(ex['prompt'])}", f"- **First answer:** {_clip(ex['response'])}"]
            for k, (c, v, p) in enumerate(zip(ex["critiques"], ex["revisions"], ex["principle_ids"]), 1):
                out += [f"- **Critique {k}** (`{p}`): {_clip(c)}", f"- **Revision {k}:** {_clip(v)}"]
            out.append("")

    # --- SFT
    sft_log = by_stage.get("sft", [])
    if sft_log:
        steps = [r["step"] for r in sft_log]
        losses = [r["loss"] for r in sft_log]
        out += ["## Supervised fine-tuning on the revisions", "",
                f"{len(steps)} optimizer steps; response-token loss {losses[0]:.3f} at the first step, "
                f"{losses[-1]:.3f} at the last (mean of the last {min(3, len(losses))}: "
                f"{sum(losses[-3:]) / len(losses[-3:]):.3f}).", "",
                _plot(run, "sft_loss", lambda ax: ax.plot(steps, losses, marker="."), "SFT loss", "step",
                      "NLL per response token"), ""]

    # --- labels
    labels = _rows(run, "label")
    if labels:
        p = [r["p_a"] for r in labels]
        first = [r["first_position_prob"] for r in labels]
        principles = sorted({pid for r in labels for pid in r["principle_ids"]})
        out += ["## AI preference labels", "",
                f"{len(labels)} pairs labelled by the feedback model with {len(labels[0]['principle_ids'])} "
                f"principle(s) each ({len(principles)} distinct principles used). Mean P(response A better) = "
                f"{sum(p) / len(p):.3f}; share of pairs with A preferred = {sum(x > 0.5 for x in p) / len(p):.3f}; "
                f"mean probability given to whichever response was shown first = {sum(first) / len(first):.3f} "
                f"(0.5 = no position bias).", "",
                _plot(run, "label_hist", lambda ax: ax.hist(p, bins=20, range=(0, 1)), "Soft labels",
                      "P(response A is better)", "pairs"), ""]

    # --- PM
    pm_log = [r for r in by_stage.get("train_pm", []) if "loss" in r]
    pm_final = [r for r in by_stage.get("train_pm", []) if "heldout_accuracy" in r]
    if pm_log or pm_final:
        out += ["## Preference model", ""]
        if pm_log:
            steps = [r["step"] for r in pm_log]
            losses = [r["loss"] for r in pm_log]
            out += [f"{len(steps)} steps of the soft-label pairwise loss: {losses[0]:.4f} at the first step, "
                    f"{losses[-1]:.4f} at the last.", "",
                    _plot(run, "pm_loss", lambda ax: ax.plot(steps, losses, marker="."), "PM training loss", "step",
                          "pairwise loss"), ""]
        if pm_final:
            f = pm_final[-1]
            out += [f"Held-out accuracy (agreement with the AI label's preferred response): "
                    f"**{_fmt(f.get('heldout_accuracy'))}** on {f.get('heldout_pairs')} held-out pairs "
                    f"({f.get('train_pairs')} used for training).", ""]

    # --- PPO
    ppo_log = by_stage.get("ppo", [])
    if ppo_log:
        its = [r["step"] for r in ppo_log]
        out += ["## RL from AI feedback (PPO)", "", "| iteration | PM score | KL (per sequence) | reward | "
                "policy loss | value loss | clip fraction |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in ppo_log:
            out.append(f"| {r['step']} | {_fmt(r.get('score'))} | {_fmt(r.get('kl'), 4)} | {_fmt(r.get('reward'))} | "
                       f"{_fmt(r.get('pg_loss'), 4)} | {_fmt(r.get('vf_loss'), 4)} | {_fmt(r.get('clipfrac'))} |")

        def draw_reward(ax):
            ax.plot(its, [r["score"] for r in ppo_log], marker=".", label="PM score")
            ax.plot(its, [r["reward"] for r in ppo_log], marker=".", label="score - kl_coef * KL")
            ax.legend()
        out += ["", _plot(run, "ppo_reward", draw_reward, "PPO reward", "iteration", "mean per rollout"), "",
                _plot(run, "ppo_kl", lambda ax: ax.plot(its, [r["kl"] for r in ppo_log], marker=".", color="C3"),
                      "KL(policy || reference)", "iteration", "KL per sequence (nats)"), ""]

    # --- evals
    mc = [r for r in evaluation if r["section"] == "mc"]
    pm_acc = [r for r in evaluation if r["section"] == "pm"]
    if mc or pm_acc:
        out += ["## Evaluations", ""]
        for r in pm_acc:
            out += [f"Preference model held-out accuracy: {_fmt(r['value'])} (n = {r['n']}).", ""]
        if mc:
            out += ["Multiple-choice evals (`cai eval mc`: normalized log-probabilities of the option "
                    "continuations; accuracy = share of questions whose correct option is the most likely):", "",
                    "| model | eval file | n | accuracy | mean P(correct) | seconds |", "| --- | --- | --- | --- | --- | --- |"]
            done = []
            for r in mc:
                d = json.loads(r["detail"])
                model, _, spec = r["name"].partition("|")
                if r["value"] is None:
                    out.append(f"| {model} | {spec} | skipped: {d.get('skipped')} | | | |")
                    continue
                done.append((f"{model}\n{Path(spec).name.replace('.jsonl', '')}", r["value"]))
                out.append(f"| {model} | {spec} | {r['n']} | {_fmt(r['value'])} | {_fmt(d.get('mean_correct_prob'))} "
                           f"| {_fmt(d.get('seconds'), 1)} |")
            if done:
                out += ["", _plot(run, "mc_accuracy", lambda ax: (ax.bar(range(len(done)), [v for _, v in done]),
                                                                   ax.set_xticks(range(len(done)), [k for k, _ in done],
                                                                                 fontsize=6),
                                                                   ax.axhline(0.5, color="gray", ls="--")),
                                  "Multiple-choice accuracy", "", "accuracy")]
            out.append("")
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
