"""Run the CAI stages in order in a run folder: skip finished stages, resume a killed one, write the report.

Data flow (each arrow a dataset in the run folder):
    prompts --critique_revise--> revisions --sft--> SL model --sample_pairs--> pairs --label--> soft labels
    --train_pm--> PM --ppo--> RL policy --evaluate--> report.md
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from .config import STAGES, RunConfig, config_from_dict, config_to_dict
from .constitution import load_constitution
from .data import load_prompts, prompt_rows, read_records
from .rundir import RunDir, atomic_write_text, load_rows, save_dataset
from .stages.common import Context
from .stages.critique_revise import critique_revise
from .stages.evaluate import evaluate
from .stages.label import label
from .stages.ppo import ppo
from .stages.sample_pairs import sample_pairs
from .stages.sft import sft
from .stages.train_pm import train_pm

STAGE_FUNCTIONS = {"critique_revise": critique_revise, "sft": sft, "sample_pairs": sample_pairs, "label": label,
                   "train_pm": train_pm, "ppo": ppo, "evaluate": evaluate}
# the dataset each stage reads ("prompts" = the run's prompt set)
STAGE_INPUT = {"critique_revise": "prompts", "sft": "critique_revise", "sample_pairs": "prompts",
               "label": "sample_pairs", "train_pm": "label", "ppo": "prompts"}


class RunConfigMismatch(RuntimeError):
    pass


def open_run(config: RunConfig, out: str | Path, *, progress: bool = True) -> Context:
    """The run folder (created, its config recorded) and the context its stages share."""
    run = RunDir(out)
    saved = run.root / "config.yaml"
    current = config_to_dict(config)
    if saved.is_file():
        previous = config_to_dict(config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}))
        if previous != current:
            changed = sorted(k for k in current if current[k] != previous.get(k))
            raise RunConfigMismatch(
                f"{run.root} was started with a different config (differs in: {', '.join(changed)}); "
                f"resume it with the same config, or use a new --out folder")
    else:
        atomic_write_text(saved, yaml.safe_dump(current, sort_keys=False))
    return Context(run=run, constitution=load_constitution(config.constitution), base_model=config.model,
                   seed=config.seed, device=config.device, dtype=config.dtype,
                   allow_download=config.allow_download, trust_remote_code=config.trust_remote_code,
                   progress=progress)


def prompts_of(config: RunConfig, ctx: Context) -> list[dict]:
    path = ctx.run.dataset_path("prompts")
    if ctx.run.is_done("prompts"):
        return load_rows(path)
    rows = load_prompts(config.prompts, allow_download=config.allow_download)
    save_dataset(rows, path)
    ctx.run.mark_done("prompts", {"rows": len(rows)})
    return rows


def stage_input(name: str, config: RunConfig, ctx: Context, input_path: str | Path | None = None):
    if name == "evaluate":
        return {s: load_rows(ctx.run.dataset_path(s)) for s in ("critique_revise", "train_pm", "ppo")
                if ctx.run.is_done(s)}
    source = STAGE_INPUT[name]
    if input_path is not None:
        path = Path(input_path)
        rows = load_rows(path) if path.is_dir() else read_records(str(path))
        return prompt_rows(rows, path.stem) if source == "prompts" else rows
    if source == "prompts":
        return prompts_of(config, ctx)
    if not ctx.run.is_done(source):
        raise RuntimeError(f"stage {name} reads the output of {source}, which has not finished in {ctx.run.root}; "
                           f"run `cai {source.replace('_', '-')}` first or give --input")
    return load_rows(ctx.run.dataset_path(source))


def run_stage(name: str, config: RunConfig, ctx: Context, *, input_path=None, log=print) -> None:
    """Run one stage (resuming it if it was killed) and record its dataset and DONE marker."""
    started = time.perf_counter()
    resumed = any((ctx.run.root / name / sub).exists() for sub in ("shards", "checkpoint"))
    log(f"[cai] {name}: {'resuming' if resumed else 'starting'}")
    rows = STAGE_FUNCTIONS[name](stage_input(name, config, ctx, input_path), getattr(config, name), ctx)
    save_dataset(rows, ctx.run.dataset_path(name))
    seconds = time.perf_counter() - started
    ctx.run.metrics.log("timing", STAGES.index(name), **{f"{name}_seconds": seconds})
    ctx.run.mark_done(name, {"rows": len(rows), "seconds": round(seconds, 2), "resumed": resumed})
    ctx.run.shards(name).clear()
    log(f"[cai] {name}: done, {len(rows)} rows in {seconds:.1f} s")


def run_all(config: RunConfig, out: str | Path, *, progress: bool = True, log=print) -> Path:
    """Every configured stage in order, then the report; returns the report's path."""
    from .report import write_report

    ctx = open_run(config, out, progress=progress)
    for name in STAGES:
        if name not in config.stages:
            continue
        if ctx.run.is_done(name):
            log(f"[cai] {name}: finished earlier, skipped")
            continue
        run_stage(name, config, ctx, log=log)
    return write_report(ctx.run, config)
