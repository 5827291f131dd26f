"""Run the CAI stages (the table in cai.stages) in order in a run folder: skip finished stages, resume a killed
one, write the report.

Data flow (each arrow a dataset in the run folder):
    prompts --critique_revise--> revisions --sft--> SL model --sample_pairs--> pairs --label--> soft labels
    --train_pm--> PM --ppo--> RL policy --evaluate--> report.md
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import yaml

from .config import RunConfig, config_from_dict, config_to_dict
from .constitution import load_constitution
from .data import load_prompts, prompt_rows, read_records
from .rundir import RunDir, atomic_write_text, load_rows, save_dataset
from .scaleout.data_parallel import DataParallel
from .stages import BY_NAME, STAGE_NAMES
from .stages.common import Context
from .training import Checkpoint


def _quiet(*_args, **_kwargs) -> None:
    pass


class RunConfigMismatch(RuntimeError):
    pass


def open_run(config: RunConfig, out: str | Path, *, progress: bool = True, engine: str = "local",
             engine_options: dict | None = None) -> Context:
    """The run folder (created, its config recorded) and the context its stages share.

    engine: "local" or "ray" for the batch stages (cai.scaleout.ray_engine). Under torchrun /
    accelerate launch the context carries the data-parallel ranks (cai.scaleout.data_parallel).
    """
    dp = DataParallel.from_env()
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
    elif dp.is_main:
        atomic_write_text(saved, yaml.safe_dump(current, sort_keys=False))
    return Context(run=run, constitution=load_constitution(config.constitution), base_model=config.model,
                   seed=config.seed, device=config.device, dtype=config.dtype,
                   allow_download=config.allow_download, trust_remote_code=config.trust_remote_code,
                   progress=progress and dp.is_main, engine=engine, engine_options=dict(engine_options or {}), dp=dp)


def prompts_of(config: RunConfig, ctx: Context) -> list[dict]:
    path = ctx.run.dataset_path("prompts")
    if ctx.dp.enabled and not ctx.run.is_done("prompts"):  # rank 0 writes them, the others read them
        if ctx.dp.is_main:
            prompts_of(config, replace(ctx, dp=DataParallel()))
        ctx.dp.barrier()
    if ctx.run.is_done("prompts"):
        return load_rows(path)
    rows = load_prompts(config.prompts, allow_download=config.allow_download)
    save_dataset(rows, path)
    ctx.run.mark_done("prompts", {"rows": len(rows)})
    return rows


def stage_input(name: str, config: RunConfig, ctx: Context, input_path: str | Path | None = None):
    source = BY_NAME[name].input
    if isinstance(source, tuple):  # several stages' datasets, those that have finished
        return {s: load_rows(ctx.run.dataset_path(s)) for s in source if ctx.run.is_done(s)}
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
    """Run one stage (resuming it if it was killed) and record its dataset and DONE marker.

    Data-parallel launches: the training stages run on every rank; the others on rank 0 while the
    other ranks wait. Rank 0 alone writes the dataset, metrics and DONE marker.
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
    rows = stage.function(stage_input(name, config, ctx, input_path), getattr(config, name), ctx)
    if not ctx.dp.is_main:
        ctx.dp.barrier()  # rank 0 writes the results
        return
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


def run_all(config: RunConfig, out: str | Path, *, progress: bool = True, log=print, engine: str = "local",
            engine_options: dict | None = None) -> Path:
    """Every configured stage in order, then the report; returns the report's path."""
    from .report import write_report

    ctx = open_run(config, out, progress=progress, engine=engine, engine_options=engine_options)
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
