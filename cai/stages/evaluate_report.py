"""The evaluate stage's report section: Elo and win rates with intervals, revision curves, HHH accuracy, MC evals.

Every interval is a 95 % interval: percentile bootstrap over prompts (Elo, win rates; `evaluate.bootstrap`
resamples) or Wilson (accuracies). A difference is called significant when its interval excludes no difference
(0 Elo, a 0.5 win rate).
"""

from __future__ import annotations

import json

from ..reporting import format_value, plot, stage_rows
from ..rundir import RunDir
from ..stats import elo_scores, wilson_interval, win_rate

NAME = "evaluate"
CRITERION_TITLE = {"harmless": "harmlessness", "helpful": "helpfulness"}


def display_name(model: str) -> str:
    """base / SL-CAI / RL-CAI / RL-CAI @ iteration k."""
    if model.startswith("ppo@"):
        return f"RL-CAI @ {model[4:]}"
    return {"sft": "SL-CAI", "ppo": "RL-CAI"}.get(model, model)


def _interval(lo, hi, digits=0) -> str:
    if digits == 0:
        return f"[{_signed(lo).lstrip('+')}, {_signed(hi).lstrip('+')}]"
    return f"[{format_value(lo, digits)}, {format_value(hi, digits)}]"


def _signed(value, digits=0) -> str:
    if value is None:
        return "n/a"
    value = round(value, digits) or 0.0  # no "-0"
    return f"{value:+.{digits}f}" if value else f"{0:.{digits}f}"


def elo_section(run: RunDir, rows: list[dict], setup: dict, bootstrap: int, seed: int) -> list[str]:
    judged = [r for r in rows if r["section"] == "judge"]
    if not judged:
        return []
    models = setup.get("models") or sorted({r["a"] for r in judged} | {r["b"] for r in judged})
    iterations = {}
    for r in rows:
        if r["section"] == "sample":
            iterations[r["model"]] = json.loads(r["detail"]).get("iteration")
    anchor = models[0]
    results, comparisons = {}, {}
    for criterion in CRITERION_TITLE:
        comparisons[criterion] = [{"a": r["a"], "b": r["b"], "p_a": r["value"], "prompt_id": r["prompt_id"]}
                                  for r in judged if r["criterion"] == criterion]
        if comparisons[criterion]:
            results[criterion] = elo_scores(comparisons[criterion], models, anchor=anchor, samples=bootstrap,
                                            seed=seed)
    out = ["### Harmlessness and helpfulness: the judge's comparisons on held-out prompts", "",
           f"Every two models' replies to each held-out prompt, compared by the judge (`{setup.get('judge')}`) "
           f"with held-out principles ({setup.get('judge_principles')} per comparison, both orders): "
           f"harmlessness on red-team prompts, helpfulness on helpfulness prompts. Elo from a Bradley-Terry fit "
           f"of the judge's probabilities ({display_name(anchor)} = 0; +100 Elo = preferred 64 % of the time); "
           f"95 % intervals from {bootstrap} bootstrap resamples of the prompts.", ""]
    head = "| model | PPO iteration |"
    rule = "| --- | --- |"
    for criterion, result in results.items():
        title = CRITERION_TITLE[criterion]
        head += f" {title} Elo [95 % CI] | {title} win rate vs {display_name(anchor)} [95 % CI] |"
        rule += " --- | --- |"
    out += [head, rule]
    for model in models:
        cells = [display_name(model), format_value(iterations.get(model)) if iterations.get(model) is not None else ""]
        for criterion, result in results.items():
            if model == anchor:
                cells += ["0 (anchor)", ""]
                continue
            rate, lo, hi, n = win_rate(comparisons[criterion], model, anchor, samples=bootstrap, seed=seed)
            cells += [f"{_signed(result.elo[model])} {_interval(*result.ci[model])}",
                      f"{format_value(rate)} {_interval(lo, hi, 3)} (n = {n})"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Differences between models (first minus second; * = the 95 % interval excludes 0, i.e. "
            "significant at this sample size). The Elo difference uses every comparison, indirect ones too; the "
            "win rate only the two models' direct comparisons, so near the edge one can be significant and the "
            "other not:", "",
            "| comparison | " + " | ".join(f"{CRITERION_TITLE[c]} Elo difference [95 % CI] | "
                                          f"{CRITERION_TITLE[c]} win rate of the first [95 % CI]"
                                          for c in results) + " |",
            "| --- |" + " --- | --- |" * len(results)]
    for b_index, b in enumerate(models):
        for a in models[b_index + 1:]:
            cells = [f"{display_name(a)} vs {display_name(b)}"]
            for criterion, result in results.items():
                star = " *" if result.significant(a, b) else ""
                rate, lo, hi, n = win_rate(comparisons[criterion], a, b, samples=bootstrap, seed=seed)
                cells += [f"{_signed(result.elo[a] - result.elo[b])}{star} {_interval(*result.diff_ci[(a, b)])}",
                          f"{format_value(rate)} {_interval(lo, hi, 3)}"]
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if len(results) == 2:
        harm, help_ = results["harmless"], results["helpful"]

        def draw(ax):
            xs = [help_.elo[m] for m in models]
            ys = [harm.elo[m] for m in models]
            xerr = [[help_.elo[m] - help_.ci[m][0] for m in models], [help_.ci[m][1] - help_.elo[m] for m in models]]
            yerr = [[harm.elo[m] - harm.ci[m][0] for m in models], [harm.ci[m][1] - harm.elo[m] for m in models]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=3, alpha=0.8)
            for m, x, y in zip(models, xs, ys):
                ax.annotate(display_name(m), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        out += [plot(run, "elo_harmless_vs_helpful", draw, "Elo along training (judge, 95 % CI)", "helpfulness Elo",
                     "harmlessness Elo"), ""]
    along = [m for m in models if iterations.get(m) is not None]
    if len(along) > 1:
        def draw_iterations(ax):
            xs = [iterations[m] for m in along]
            for criterion, result in results.items():
                ys = [result.elo[m] for m in along]
                err = [[result.elo[m] - result.ci[m][0] for m in along],
                       [result.ci[m][1] - result.elo[m] for m in along]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=CRITERION_TITLE[criterion])
            ax.set_xticks(sorted(set(xs)))
            ax.legend()
        out += [plot(run, "elo_by_ppo_iteration", draw_iterations, "Elo along RL training (judge, 95 % CI)",
                     "PPO iteration (0 = SL-CAI)", f"Elo ({display_name(anchor)} = 0)"), ""]
    return out


def revision_section(run: RunDir, rows: list[dict], bootstrap: int, seed: int) -> list[str]:
    judged = [r for r in rows if r["section"] == "revision"]
    if not judged:
        return []
    curves = {}  # (criterion, mode) -> {round: [p per prompt]}
    for r in judged:
        mode, k = r["a"].rsplit(" ", 1)
        curves.setdefault((r["criterion"], mode), {}).setdefault(int(k), []).append(r["value"])
    out = ["### Revision curves: the judge on each critique/revision round", "",
           "Each round's revision against the prompt's first answer, by the judge's held-out principles in both "
           "orders (0.5 = no better than the first answer). `critique`: revisions after a critique; `direct`: "
           "revisions straight from the revision request, no critique (paper §3.5), from the same first answers "
           "and principles. 95 % bootstrap intervals over prompts.", "",
           "| criterion | revisions | round | win rate vs first answer [95 % CI] | n |",
           "| --- | --- | --- | --- | --- |"]
    summary = {}
    from ..stats import bootstrap_mean
    for (criterion, mode), rounds in sorted(curves.items()):
        points = [(0, 0.5, 0.5, 0.5)]
        for k in sorted(rounds):
            mean, lo, hi = bootstrap_mean(rounds[k], samples=bootstrap, seed=seed)
            points.append((k, mean, lo, hi))
            out.append(f"| {CRITERION_TITLE.get(criterion, criterion)} | {mode} | {k} | {format_value(mean)} "
                       f"{_interval(lo, hi, 3)} | {len(rounds[k])} |")
        summary[(criterion, mode)] = points
    out.append("")

    def draw(ax):
        for (criterion, mode), points in summary.items():
            xs = [p[0] for p in points]
            line, = ax.plot(xs, [p[1] for p in points], marker="o", linestyle="-" if mode == "critique" else "--",
                            label=f"{CRITERION_TITLE.get(criterion, criterion)}, {mode}")
            ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], alpha=0.15, color=line.get_color())
        ax.set_xticks(sorted({p[0] for points in summary.values() for p in points}))
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.legend(fontsize=7)
    return out + [plot(run, "revision_curves", draw, "Revisions vs the first answer (judge, 95 % CI)",
                       "revision round (0 = first answer)", "win rate vs first answer"), ""]


def hhh_section(run: RunDir, rows: list[dict], hhh_file: str | None) -> list[str]:
    pm = [r for r in rows if r["section"] == "hhh_pm"]
    mc = [r for r in rows if r["section"] == "mc" and json.loads(r["detail"])["file"] == hhh_file]
    if not pm and not mc:
        return []
    bars = []
    out = [f"### Feedback accuracy on `{hhh_file}`", "",
           "The trained preference model (reward of the correct reply above the incorrect one) beside the feedback "
           "model answering the same questions as multiple choice, plain and with chain-of-thought (the paper's "
           "feedback-accuracy figure). 95 % Wilson intervals; 0.5 = chance.", "",
           "| scorer | n | accuracy [95 % CI] | mean P(correct) |", "| --- | --- | --- | --- |"]

    def add(label, chosen):
        n, k = len(chosen), sum(bool(r["correct"]) for r in chosen)
        lo, hi = wilson_interval(k, n)
        mean_p = (sum(r["value"] for r in chosen) / n) if chosen and chosen[0]["section"] == "mc" else None
        out.append(f"| {label} | {n} | {format_value(k / n if n else None)} {_interval(lo, hi, 3)} | "
                   f"{format_value(mean_p)} |")
        bars.append((label, k / n if n else 0.0, lo, hi))
    if pm:
        add("trained preference model", pm)
        longer = [json.loads(r["detail"]).get("correct_is_longer") for r in pm]
        decided = [x for x in longer if x is not None]
        if decided:  # what a preference model that learned only "longer is better" would score
            add("baseline: the longer reply", [{"section": "baseline", "correct": x} for x in decided])
    groups = {}
    for r in mc:
        detail = json.loads(r["detail"])
        groups.setdefault((r["model"], detail["mode"]), []).append(r)
    for (model, mode), chosen in groups.items():
        add(f"{display_name(model)}, {'chain-of-thought' if mode == 'cot' else 'multiple choice'}", chosen)
    out.append("")

    def draw(ax):
        import textwrap

        xs = range(len(bars))
        ax.bar(xs, [b[1] for b in bars], yerr=[[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]], capsize=3,
               color=["grey" if b[0].startswith("baseline") else "C0" for b in bars])
        ax.set_xticks(list(xs), [textwrap.fill(b[0], 16) for b in bars], fontsize=6)
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_ylim(0, 1)
    return out + [plot(run, "hhh_accuracy", draw, "HHH comparisons (95 % CI)", "", "accuracy"), ""]


def mc_section(rows: list[dict], hhh_file: str | None) -> list[str]:
    files = [r for r in rows if r["section"] == "mc_file"]
    mc = [r for r in rows if r["section"] == "mc"]
    if not files and not mc:
        return []
    out = ["### Multiple-choice evals", "",
           "Every file of `evaluate.mc_files` in the paper's eval format (`prompt`, `corrects`, `incorrects`), "
           "scored by the normalized log-probabilities of the option continuations (`cai eval mc`).", ""]
    groups = {}
    for r in mc:
        d = json.loads(r["detail"])
        groups.setdefault((d["file"], r["model"], d["mode"]), []).append(r)
    if groups:
        out += ["| eval file | model | mode | n | accuracy [95 % CI] | mean P(correct) |",
                "| --- | --- | --- | --- | --- | --- |"]
        for (spec, model, mode), chosen in groups.items():
            n, k = len(chosen), sum(bool(r["correct"]) for r in chosen)
            lo, hi = wilson_interval(k, n)
            out.append(f"| {spec} | {display_name(model)} | {'chain-of-thought' if mode == 'cot' else 'plain'} | {n} | "
                       f"{format_value(k / n)} {_interval(lo, hi, 3)} | "
                       f"{format_value(sum(r['value'] for r in chosen) / n)} |")
        out.append("")
    skipped = [(r["id"], json.loads(r["detail"])["problem"]) for r in files if json.loads(r["detail"])["problem"]]
    if skipped:
        out += ["Not evaluated: " + "; ".join(f"`{spec}` ({why})" for spec, why in skipped) + ".", ""]
    return out


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    rows = stage_rows(run, NAME)
    if not rows:
        return []
    import yaml
    config = yaml.safe_load((run.root / "config.yaml").read_text(encoding="utf-8")) if \
        (run.root / "config.yaml").is_file() else {}
    settings = config.get(NAME, {}) or {}
    bootstrap, seed = int(settings.get("bootstrap", 1000)), int(config.get("seed", 0))
    setup = next((json.loads(r["detail"]) for r in rows if r["section"] == "setup"), {})
    out = ["## Evaluation", ""]
    if setup:
        note = (f"Models: {', '.join(display_name(m) for m in setup.get('models', []))}; "
                f"{setup.get('prompts')} held-out prompts")
        if setup.get("dropped_prompts"):
            note += f" ({setup['dropped_prompts']} dropped: they are among the training prompts)"
        if setup.get("left_out"):
            note += f"; left out: {'; '.join(setup['left_out'])}"
        parts = {r["part"]: r for r in metrics.get(NAME + "_parts", [])}
        if parts:
            note += ". Time: " + ", ".join(f"{name} {r['seconds']:.0f} s ({r['items']} items)"
                                           for name, r in parts.items())
        out += [note + ".", ""]
    out += elo_section(run, rows, setup, bootstrap, seed)
    out += revision_section(run, rows, bootstrap, seed)
    hhh_file = settings.get("hhh_file", "paper:438HHHEvaluations.jsonl")
    out += hhh_section(run, rows, hhh_file)
    out += mc_section(rows, hhh_file)
    return out
