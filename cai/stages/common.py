"""What every stage shares: the run context (models, constitution, seeds) and resumable batch loops."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..constitution import Constitution
from ..models import load_model
from ..rundir import RunDir, atomic_write_json


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
    _loaded: dict = field(default_factory=dict, repr=False)

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


def run_batches(ctx: Context, stage: str, items: list[dict], batch_size: int, process, *, desc: str,
                fingerprint: dict | None = None) -> list[dict]:
    """Apply `process(batch_index, batch_items) -> rows` batch by batch, one shard per finished batch.

    Finished batches (their shard exists) are skipped, so a killed stage resumes where it stopped. The
    shards belong to one plan (the items' ids, the batch size and `fingerprint`, e.g. the stage config);
    if the plan changed they are discarded. `process` must seed itself from the batch, not process state.
    """
    shards = ctx.run.shards(stage)
    plan = {"ids": hashlib.sha256(json.dumps([r.get("id") for r in items]).encode()).hexdigest(),
            "batch_size": batch_size, "fingerprint": fingerprint or {}, "seed": ctx.seed,
            "base_model": ctx.base_model, "constitution": ctx.constitution.source}
    plan_path = shards.folder / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != json.loads(json.dumps(plan)):
        shards.clear()
    shards.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    count = math.ceil(len(items) / batch_size)
    finished = sum(shards.done(i) for i in range(count))
    bar = ctx.tqdm(total=count, initial=finished, desc=desc, unit="batch")
    for i in range(count):
        if shards.done(i):
            continue
        shards.write(i, process(i, items[i * batch_size:(i + 1) * batch_size]))
        bar.update(1)
    bar.close()
    return shards.read_all(count)


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
