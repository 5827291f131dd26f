"""What every stage shares: the run context (models, constitution, seeds) and resumable batch loops."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import CaiWarning
from ..constitution import Constitution
from ..scaleout.data_parallel import DataParallel
from ..models import load_model
from ..prompts import rng_for
from ..rundir import DamagedRunError, RunDir, atomic_write_json


@dataclass
class Context:
    """Run-wide settings a stage needs besides its own config."""
    run: RunDir
    constitution: Constitution
    base_model: str = "embedded"  # policy init, feedback model and PM init unless a stage names another
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    allow_download: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    # prompts longer than the model's context: "truncate-left" (with a warning that counts them) or "error"
    prompt_overflow: str = "truncate-left"
    # damaged resume state (shards, checkpoints): redo just what is damaged instead of stopping with an error
    repair: bool = False
    # how batch stages run: "local" (this process) or "ray" (an actor pool, cai.scaleout.ray_engine);
    # engine_options: address, actors, cpus_per_actor, gpus_per_actor (see cai.scaleout.ray_engine)
    engine: str = "local"
    engine_options: dict = field(default_factory=dict)
    # data-parallel ranks under torchrun / accelerate launch (cai.scaleout.data_parallel); one process by default
    dp: "DataParallel" = field(default_factory=lambda: DataParallel())

    def model_path(self, spec: str | None, default: str) -> str:
        """A stage's model: `spec` if given; "base" / "sft" / "ppo" / "train_pm" name the run's models."""
        spec = spec or default
        if spec == "base":
            return self.base_model
        if spec in ("sft", "ppo", "train_pm"):
            path = self.run.root / spec / "model"
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: the {spec} stage has not produced its model yet")
            return str(path)
        return spec

    def load(self, spec: str | None, default: str = "base"):
        """(model, tokenizer) for a stage, in eval mode."""
        return load_model(self.model_path(spec, default), device=self.device, dtype=self.dtype,
                          allow_download=self.allow_download, trust_remote_code=self.trust_remote_code)

    def tqdm(self, iterable=None, **kwargs):
        from tqdm.auto import tqdm
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, **kwargs)


def run_batches(ctx: Context, stage: str, items: list[dict], batch_size: int, process=None, *, desc: str,
                fingerprint: dict | None = None, make_process=None) -> list[dict]:
    """Apply `process(batch_index, batch_items) -> rows` batch by batch, one shard per finished batch.

    Finished batches (their shard exists) are skipped, so a killed stage resumes where it stopped. The
    shards belong to one plan (the items' ids, the batch size and `fingerprint`, e.g. the stage config);
    if the plan changed they are discarded. Every shard checks itself (row count and checksum, see
    cai.rundir): damaged ones are an error naming them, or with ctx.repair are set aside and redone.
    `process` must seed itself from the batch, not process state. Instead of `process`, a stage may
    pass `make_process(ctx) -> process` (picklable: a module-level function, or a functools.partial of
    one): it is called only if some batch is left, and with ctx.engine == "ray" it runs once per Ray
    actor, which then processes batches in parallel.
    """
    shards = ctx.run.shards(stage)
    plan = {"ids": hashlib.sha256(json.dumps([r.get("id") for r in items]).encode()).hexdigest(),
            "batch_size": batch_size, "fingerprint": fingerprint or {}, "seed": ctx.seed,
            "base_model": ctx.base_model, "constitution": ctx.constitution.source}
    plan_path = shards.folder / "plan.json"
    if plan_path.is_file():
        try:
            previous = json.loads(plan_path.read_text(encoding="utf-8"))
        except ValueError:
            if not ctx.repair:
                raise DamagedRunError([(plan_path, "not valid JSON")], "re-run with --repair to redo this stage's "
                                      "batches (which batches the shards belong to is unknown)") from None
            warnings.warn(f"{plan_path}: damaged; the stage's finished batches are redone (--repair)", CaiWarning)
            previous = None
        if previous != json.loads(json.dumps(plan)):
            shards.clear()
    shards.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    count = math.ceil(len(items) / batch_size)
    damaged = shards.damaged(count)
    if damaged and not ctx.repair:
        raise DamagedRunError([(shards.path(i), problem) for i, problem in damaged],
                              f"{len(damaged)} of the {count} batches of {stage} have damaged shards: re-run with "
                              f"--repair to redo just those batches")
    for i, problem in damaged:
        aside = shards.set_aside(i)
        warnings.warn(f"{shards.path(i)}: {problem}; moved aside to {aside.name}, batch {i} is redone (--repair)",
                      CaiWarning)
    pending = [i for i in range(count) if not shards.done(i)]
    bar = ctx.tqdm(total=count, initial=count - len(pending), desc=desc, unit="batch")
    if pending and ctx.engine == "ray" and make_process is not None:
        from ..scaleout.ray_engine import run_on_ray

        run_on_ray(ctx, stage, items, batch_size, pending, make_process, shards, bar)
    elif pending:
        process = process if process is not None else make_process(ctx)
        for i in pending:
            shards.write(i, process(i, items[i * batch_size:(i + 1) * batch_size]))
            bar.update(1)
    bar.close()
    return shards.read_all(count)


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class EpochSchedule:
    """Which examples each optimizer step trains on: ``epochs`` passes over ``n_examples`` in batches
    of ``batch_size``, each pass in a shuffled order drawn from (seed, stage, epoch), so a resumed run
    takes the same batches; at most ``max_steps`` steps."""

    def __init__(self, n_examples: int, batch_size: int, epochs: int, max_steps: int | None, seed: int, stage: str):
        self.n_examples, self.batch_size, self.seed, self.stage = n_examples, batch_size, seed, stage
        self.steps_per_epoch = math.ceil(n_examples / batch_size)
        self.total = self.steps_per_epoch * epochs
        if max_steps is not None:
            self.total = min(max_steps, self.total)

    def indices(self, step: int) -> list[int]:
        """The example indices of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(self.n_examples))
        rng_for(self.seed, self.stage, "epoch", epoch).shuffle(order)
        return order[k * self.batch_size:(k + 1) * self.batch_size]



class MixedSchedule:
    """Which examples each optimizer step trains on when batches mix several example streams at fixed counts.

    ``sizes``: stream -> number of examples; ``per_batch``: stream -> how many of its examples every batch
    holds (e.g. {"harmless": 5, "helpful": 3}). An epoch is as many steps as the stream that needs the most takes
    to be seen once; a stream that runs out sooner starts another pass. Every pass of a stream is shuffled by
    (seed, stage, stream, pass), so a resumed run takes the same batches. At most ``max_steps`` steps.
    """

    def __init__(self, sizes: dict[str, int], per_batch: dict[str, int], epochs: int, max_steps: int | None,
                 seed: int, stage: str):
        self.sizes = {k: n for k, n in sizes.items() if n > 0 and per_batch.get(k, 0) > 0}
        if not self.sizes:
            raise ValueError(f"{stage}: no examples to train on (sizes {sizes}, per batch {per_batch})")
        self.per_batch = {k: per_batch[k] for k in self.sizes}
        self.seed, self.stage = seed, stage
        self.steps_per_epoch = max(math.ceil(n / self.per_batch[k]) for k, n in self.sizes.items())
        self.total = self.steps_per_epoch * epochs
        if max_steps is not None:
            self.total = min(max_steps, self.total)
        self._orders: dict[tuple[str, int], list[int]] = {}

    def _order(self, stream: str, pass_index: int) -> list[int]:
        key = (stream, pass_index)
        if key not in self._orders:
            order = list(range(self.sizes[stream]))
            rng_for(self.seed, self.stage, stream, "pass", pass_index).shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def indices(self, step: int) -> list[tuple[str, int]]:
        """(stream, example index) of every example of optimizer step ``step`` (0-based), stream by stream."""
        out = []
        for stream, count in self.per_batch.items():
            n = self.sizes[stream]
            for position in range(step * count, (step + 1) * count):
                out.append((stream, self._order(stream, position // n)[position % n]))
        return out
