"""The Ray engine for batch stages (critique_revise, sample_pairs, label): one model per actor.

A stage's batches are the same as with the local engine; each batch becomes one row of a Ray
Dataset, and ``map_batches`` with a fixed actor pool runs ``make_process(ctx)`` once per actor (the
model loads once per actor, on a GPU when ``gpus_per_actor`` > 0) and then ``process(batch_index,
items)`` per batch. Batches seed themselves from (seed, stage, batch index) alone, so the rows are
identical to the local engine's. The driver writes each batch's shard as it arrives, so a killed run
resumes with either engine, and replays the metrics the actors logged into the run's metrics.jsonl.

Options (``Context.engine_options``, from ``cai ... --engine ray``):
    address          Ray address (None: the running cluster / ``RAY_ADDRESS``, or a local one)
    actors           actor-pool size (default: as many as the cluster's GPUs / CPUs allow)
    cpus_per_actor   CPUs per actor (default 1; also its torch thread count)
    gpus_per_actor   GPUs per actor (default 1 when the cluster has GPUs, else 0)
On a multi-node cluster the run folder must be on a shared filesystem when a stage reads a model
the run produced (e.g. sample_pairs reads sft/model); the rows themselves travel through Ray.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)


class _RecordingMetrics:
    """Stands in for the run's Metrics inside an actor: records what the stage logs, for the driver."""

    def __init__(self):
        self.records: list[tuple[str, int, dict]] = []

    def log(self, stage: str, step: int, **values) -> None:
        self.records.append((stage, int(step), values))

    def take(self) -> list:
        records, self.records = self.records, []
        return records


@dataclass
class _WorkerRun:
    """The parts of a RunDir a batch stage's process uses, without touching the driver's disk."""

    root: Path
    metrics: _RecordingMetrics


class _BatchActor:
    """Ray Data callable class: builds the stage's process once, then runs one stage batch per call."""

    def __init__(self, make_process, ctx, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.ctx = replace(ctx, run=_WorkerRun(Path(ctx.run.root), _RecordingMetrics()))
        self.process = make_process(self.ctx)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        indices, rows, metrics = [], [], []
        for index, items in zip(batch["batch_index"], batch["items"]):
            out = self.process(int(index), json.loads(str(items)))
            indices.append(int(index))
            rows.append(json.dumps(out, ensure_ascii=False))
            metrics.append(json.dumps(self.ctx.run.metrics.take()))
        return {"batch_index": np.array(indices, dtype=np.int64), "rows": np.array(rows, dtype=object),
                "metrics": np.array(metrics, dtype=object)}


def _init_ray(address: str | None):
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    return ray


def _pool(ray, options: dict, pending: int) -> tuple[int, float, float]:
    """(actors, cpus per actor, gpus per actor) for this cluster and this many batches."""
    resources = ray.cluster_resources()
    gpus = options.get("gpus_per_actor")
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    cpus = float(options.get("cpus_per_actor") or 1)
    actors = options.get("actors")
    if actors is None:
        fit = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / cpus
        actors = max(1, int(fit))
    return max(1, min(int(actors), pending)), cpus, float(gpus)


def worker_context(ctx):
    """The Context an actor gets: the same settings, a single process, no progress bars."""
    from .data_parallel import DataParallel

    return replace(ctx, engine="local", engine_options={}, dp=DataParallel(), progress=False)


def run_on_ray(ctx, stage: str, items: list[dict], batch_size: int, pending: list[int], make_process, shards,
               bar) -> None:
    """Process the `pending` batches of a stage on a Ray actor pool; write each one's shard as it arrives."""
    options = dict(ctx.engine_options)
    ray = _init_ray(options.get("address"))
    actors, cpus, gpus = _pool(ray, options, len(pending))
    log.info("%s: %d batches on %d Ray actors (%g CPUs, %g GPUs each)", stage, len(pending), actors, cpus, gpus)
    ray.data.DataContext.get_current().enable_progress_bars = bool(ctx.progress)
    tasks = [{"batch_index": i, "items": json.dumps(items[i * batch_size:(i + 1) * batch_size], ensure_ascii=False)}
             for i in pending]
    # one block per batch, so the pool's actors share them out
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    results = dataset.map_batches(_BatchActor, fn_constructor_args=(make_process, worker_context(ctx), int(cpus)),
                                  batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                                  num_gpus=gpus or None)
    for row in results.iter_rows():
        shards.write(int(row["batch_index"]), json.loads(row["rows"]))
        for record_stage, step, values in json.loads(row["metrics"]):
            ctx.run.metrics.log(record_stage, step, **values)
        bar.update(1)
