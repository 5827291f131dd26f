"""Run the CAI stages (the table in cai.stages) in order in a run folder: skip finished stages, resume a killed
one, write the report.

Data flow (each arrow a dataset in the run folder):
    prompts --critique_revise--> revisions --sft--> SL model --sample_pairs--> pairs --label--> soft labels
    --train_pm--> PM --ppo--> RL policy --evaluate--> report.md
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import yaml

from . import CaiWarning
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict
from .constitution import load_constitution
from .data import load_prompts, prompt_rows, read_records
from .rundir import DamagedRunError, RunDir, RunLockedError, atomic_write_text, load_rows, save_dataset
from .scaleout.data_parallel import DataParallel
from .stages import BY_NAME, STAGE_NAMES
from .stages.common import Context
from .training import Checkpoint


def _quiet(*_args, **_kwargs) -> None:
    pass


class RunConfigMismatch(RuntimeError):
    pass


def _command(name: str) -> str:
    return "cai " + name.replace("_", "-")


def open_run(config: RunConfig, out: str | Path, *, progress: bool = True, engine: str = "local",
             engine_options: dict | None = None, repair: bool = False) -> Context:
    """The run folder (created, locked, its config recorded) and the context its stages share.

    engine: "local" or "ray" for the batch stages (cai.scaleout.ray_engine). Under torchrun /
    accelerate launch the context carries the data-parallel ranks (cai.scaleout.data_parallel).
    repair: damaged resume state (shards, checkpoints, finished stages' datasets) is redone instead of
    being an error.
    """
    dp = DataParallel.from_env()
    run = RunDir(out)
    # one launch at a time per folder: rank 0 holds the lock for all ranks of its launch, and every rank
    # learns the outcome, so a refused launch stops on every rank instead of leaving some in a barrier
    refusal = None
    if dp.is_main:
        try:
            run.lock()
        except RunLockedError as err:
            refusal = str(err)
    refusal = dp.gather(refusal)[0]
    if refusal:
        raise RunLockedError(refusal)
    saved = run.root / "config.yaml"
    current = config_to_dict(config)
    if saved.is_file():
        try:
            previous = config_to_dict(config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}))
        except (yaml.YAMLError, ConfigError, ValueError) as err:
            raise DamagedRunError([(saved, f"not a valid run config ({err})")],
                                  "restore it from a backup, or start the run in a new --out folder") from None
        if previous != current:
            changed = sorted(k for k in current if current[k] != previous.get(k))
            raise RunConfigMismatch(
                f"{run.root} was started with a different config (differs in: {', '.join(changed)}); "
                f"resume it with the same config, or use a new --out folder")
    elif dp.is_main:
        atomic_write_text(saved, yaml.safe_dump(current, sort_keys=False))
    return Context(run=run, constitution=load_constitution(config.constitution), base_model=config.model,
                   seed=config.seed, device=config.device, dtype=config.dtype,
                   allow_download=config.allow_download, trust_remote_code=config.trust_remote_code,
                   progress=progress and dp.is_main, prompt_overflow=config.prompt_overflow, repair=repair,
                   engine=engine, engine_options=dict(engine_options or {}), dp=dp)


def finished_rows(ctx: Context, name: str) -> list[dict]:
    """The dataset of a finished stage (or of the prompt set), checked against its manifest."""
    try:
        return load_rows(ctx.run.dataset_path(name))
    except DamagedRunError as err:
        redo = "`cai run --repair`" if name == "prompts" else f"`{_command(name)} --out {ctx.run.root}`"
        raise DamagedRunError(err.problems, f"the dataset of the finished stage {name} is damaged: recompute it "
                                            f"with {redo} (`cai run --repair` recomputes every damaged one)") from None


def prompts_of(config: RunConfig, ctx: Context) -> list[dict]:
    path = ctx.run.dataset_path("prompts")
    if ctx.dp.enabled and not ctx.run.is_done("prompts"):  # rank 0 writes them, the others read them
        if ctx.dp.is_main:
            prompts_of(config, replace(ctx, dp=DataParallel()))
        ctx.dp.barrier()
    if ctx.run.is_done("prompts"):
        if not (ctx.repair and ctx.run.dataset_problems("prompts")):
            return finished_rows(ctx, "prompts")
        aside = ctx.run.undo("prompts")
        warnings.warn(f"{path}: damaged; moved aside to {aside} and read again from the sources (--repair)",
                      CaiWarning)
    rows = load_prompts(config.prompts, allow_download=config.allow_download)
    save_dataset(rows, path)
    ctx.run.mark_done("prompts", {"rows": len(rows)})
    return rows


def stage_input(name: str, config: RunConfig, ctx: Context, input_path: str | Path | None = None):
    source = BY_NAME[name].input
    if isinstance(source, tuple):  # several stages' datasets, those that have finished
        return {s: finished_rows(ctx, s) for s in source if ctx.run.is_done(s)}
    if input_path is not None:
        path = Path(input_path)
        rows = load_rows(path) if path.is_dir() else read_records(str(path), allow_download=config.allow_download)
        if not rows:
            raise ValueError(f"--input {path}: no rows")
        return prompt_rows(rows, path.stem) if source == "prompts" else rows
    if source == "prompts":
        return prompts_of(config, ctx)
    if not ctx.run.is_done(source):
        raise RuntimeError(f"stage {name} reads the output of {source}, which has not finished in {ctx.run.root}; "
                           f"run `{_command(source)}` first or give --input")
    rows = finished_rows(ctx, source)
    if not rows:
        raise ValueError(f"stage {name} reads the output of {source}, which has no rows "
                         f"({ctx.run.dataset_path(source)})")
    return rows


def check_unique(rows: list[dict], key: tuple[str, ...]) -> list[str]:
    """Messages for rows that share `key` (e.g. ("id",)) with an earlier row; [] when all keys are distinct."""
    first, problems = {}, []
    for i, row in enumerate(rows):
        value = tuple(row.get(k) for k in key)
        if value in first:
            shown = value[0] if len(key) == 1 else dict(zip(key, value))
            problems.append(f"rows {first[value]} and {i} have the same {'/'.join(key)} {shown!r}")
        else:
            first[value] = i
    return problems


def run_stage(name: str, config: RunConfig, ctx: Context, *, input_path=None, log=print) -> None:
    """Run one stage (resuming it if it was killed) and record its dataset and DONE marker.

    Data-parallel launches: the training stages run on every rank; the others on rank 0 while the
    other ranks wait. Rank 0 alone writes the dataset, metrics and DONE marker. The stage's rows must
    have distinct keys (the table's `key`), else nothing is marked done and its resume state is kept.
    """
    stage = BY_NAME[name]
    if ctx.dp.enabled and stage.scale_out != "data_parallel":
        if ctx.dp.is_main:
            run_stage(name, config, replace(ctx, dp=DataParallel()), input_path=input_path, log=log)
        ctx.dp.barrier()
        return
    if not ctx.dp.is_main:
        log = _quiet
    started = time.perf_counter()
    stage_dir = ctx.run.root / name
    resumed = stage_dir.is_dir() and (any(stage_dir.rglob("shards")) or (stage_dir / "checkpoint").exists())
    log(f"[cai] {name}: {'resuming' if resumed else 'starting'}")
    inputs = stage_input(name, config, ctx, input_path)
    if isinstance(inputs, list) and all("id" in row for row in inputs):
        duplicates = check_unique(inputs, ("id",))
        if duplicates:
            raise ValueError("\n".join([f"the input of {name}: {d}" for d in duplicates[:5]]
                                       + ["every input row needs its own id"]))
    rows = stage.function(inputs, getattr(config, name), ctx)
    if not ctx.dp.is_main:
        ctx.dp.barrier()  # rank 0 writes the results
        return
    duplicates = check_unique(rows, stage.key)
    if duplicates:
        raise DamagedRunError([(ctx.run.root / name, d) for d in duplicates[:5]],
                              f"{len(duplicates)} rows of {name} repeat another row's {'/'.join(stage.key)}, so the "
                              f"stage was not marked done (shards copied or edited by hand?); delete "
                              f"{ctx.run.shards(name).folder} to recompute the stage")
    save_dataset(rows, ctx.run.dataset_path(name))
    seconds = time.perf_counter() - started
    ctx.run.metrics.log("timing", STAGE_NAMES.index(name), **{f"{name}_seconds": seconds})
    ctx.run.mark_done(name, {"rows": len(rows), "seconds": round(seconds, 2), "resumed": resumed,
                             "ranks": ctx.dp.world})
    # resume state is dropped only once the stage is recorded as done (a stage of several parts has shards
    # in a folder per part)
    for shards in sorted(stage_dir.rglob("shards"), reverse=True):
        shutil.rmtree(shards, ignore_errors=True)
    Checkpoint(ctx.run.root / name).clear()
    log(f"[cai] {name}: done, {len(rows)} rows in {seconds:.1f} s")
    ctx.dp.barrier()


def check_finished(config: RunConfig, ctx: Context) -> None:
    """Check the datasets of the finished stages (and the prompt set) before running anything.

    Damage is an error listing the files; with ctx.repair each damaged stage is marked unfinished (its
    dataset moved aside) so that the run recomputes it.
    """
    names = [n for n in ("prompts",) + STAGE_NAMES if n == "prompts" or n in config.stages]
    damaged = {n: ctx.run.dataset_problems(n) for n in names if ctx.run.is_done(n)}
    damaged = {n: problems for n, problems in damaged.items() if problems}
    if damaged and not ctx.repair:
        raise DamagedRunError([p for problems in damaged.values() for p in problems],
                              f"the datasets of the finished stage(s) {', '.join(damaged)} are damaged: re-run with "
                              f"--repair to recompute them (those stages run again)")
    for name in damaged:
        aside = ctx.run.undo(name)
        warnings.warn(f"{ctx.run.root / name}: damaged dataset moved aside to {aside}; the stage runs again "
                      f"(--repair)", CaiWarning)


def run_all(config: RunConfig, out: str | Path, *, progress: bool = True, log=print, engine: str = "local",
            engine_options: dict | None = None, repair: bool = False) -> Path:
    """Every configured stage in order, then the report; returns the report's path."""
    from .report import write_report

    ctx = open_run(config, out, progress=progress, engine=engine, engine_options=engine_options, repair=repair)
    problem = None
    if ctx.dp.is_main:  # rank 0 checks (and repairs); every rank stops on its verdict
        try:
            check_finished(config, ctx)
        except DamagedRunError as err:
            problem = err
    if any(ctx.dp.gather(problem is not None)):
        raise problem or RuntimeError("rank 0 found damaged datasets in the run folder (see its error)")
    for name in STAGE_NAMES:
        if name not in config.stages:
            continue
        # rank 0's view decides, so every rank enters the same stages (and barriers)
        if ctx.dp.gather(ctx.run.is_done(name))[0]:
            log(f"[cai] {name}: finished earlier, skipped")
            continue
        run_stage(name, config, ctx, log=log)
    if not ctx.dp.is_main:
        return ctx.run.root / "report.md"
    return write_report(ctx.run, config)
