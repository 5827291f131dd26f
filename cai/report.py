"""report.md from a run folder: the header, the stage summary, then each stage's own section in table order.

The sections (markdown + PNG plots) are written by the stages themselves (`report` in the cai.stages table;
shared helpers in cai.reporting), from the run's datasets and metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from .reporting import done_info, format_value
from .rundir import RunDir, atomic_write_text
from .stages import STAGES


def _summary(run: RunDir) -> list[str]:
    """One table row per stage (rows, seconds, resumed) and the total stage time."""
    out = ["## Stages", "", "| stage | rows | seconds | resumed |", "| --- | --- | --- | --- |"]
    total = 0.0
    for stage in STAGES:
        info = done_info(run, stage.name)
        if info:
            total += info.get("seconds", 0.0)
            out.append(f"| {stage.name} | {info.get('rows')} | {format_value(info.get('seconds'), 1)} | "
                       f"{'yes' if info.get('resumed') else 'no'} |")
        else:
            out.append(f"| {stage.name} | not run | | |")
    return out + ["", f"Total stage time: {total:.1f} s.", ""]


def write_report(run: RunDir, config) -> Path:
    """Write <run>/report.md (and <run>/plots/*.png); returns its path."""
    metrics = {}
    for record in run.metrics.read():
        metrics.setdefault(record["stage"], []).append(record)
    out = [f"# CAI run: {config.name}", "",
           f"Base model `{config.model}`, constitution `{config.constitution}`, seed {config.seed}. "
           f"Run folder `{run.root}`.", ""]
    out += _summary(run)
    for stage in STAGES:
        if stage.report is not None:
            out += stage.report(run, metrics)
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
