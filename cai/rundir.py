"""The run folder: atomic writes, per-batch shards for resuming, metrics.jsonl.

Layout of a run folder:
    config.yaml                 the resolved run config
    metrics.jsonl               one JSON object per line: {"stage", "step", "time", <metric>: value, ...}
    <stage>/shards/00007.jsonl  rows of finished batch 7 of a stage that is still running
    <stage>/dataset/            the stage's output, a `datasets` dataset (save_to_disk), written atomically
    <stage>/model/ ...          checkpoints (safetensors)
    <stage>/DONE                written last: the stage is finished and is skipped on re-run
    report.md, plots/*.png

Every file is written to a temporary name in the same folder and moved into place with os.replace, so a
kill leaves either the old state or the new one, never half a file. A batch is finished once its shard
exists; a resumed stage skips finished batches (their seeds depend only on the batch, so the redone work
is identical to what an uninterrupted run does).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written folder into place, replacing any older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def save_dataset(rows: list[dict], target: str | os.PathLike):
    """Write rows as a `datasets` dataset folder atomically; returns the Dataset."""
    from datasets import Dataset

    target = Path(target)
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({})
    staging = staging_dir(target)
    try:
        dataset.save_to_disk(str(staging))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def load_rows(source: str | os.PathLike) -> list[dict]:
    """Rows of a dataset folder written by `save_dataset` (or of a stage folder holding one)."""
    from datasets import load_from_disk

    source = Path(source)
    if (source / "dataset").is_dir():
        source = source / "dataset"
    return load_from_disk(str(source)).to_list()


class Shards:
    """Per-batch JSONL shards of a stage in progress: batch i is done once shards/i.jsonl exists."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder) / "shards"

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.jsonl"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, rows: list[dict]) -> None:
        atomic_write_text(self.path(index), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        # CAI_DEBUG_SHARD_DELAY=<stage>:<seconds> pauses after each shard of that stage, so the resume
        # tests can kill a run between two shards
        stage, _, delay = os.environ.get("CAI_DEBUG_SHARD_DELAY", "").partition(":")
        if delay and stage == self.folder.parent.name:
            time.sleep(float(delay))

    def read(self, index: int) -> list[dict]:
        with open(self.path(index), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def read_all(self, count: int) -> list[dict]:
        rows = []
        for i in range(count):
            rows.extend(self.read(i))
        return rows

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Metrics:
    """Append-only metrics.jsonl. A resumed stage may log a step twice; readers keep the last record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def log(self, stage: str, step: int, **values) -> None:
        record = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self, stage: str | None = None) -> list[dict]:
        """Records in step order, one per (stage, step, keys), the last written winning."""
        if not self.path.is_file():
            return []
        latest = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if stage is None or record.get("stage") == stage:
                    key = (record["stage"], record["step"], tuple(sorted(set(record) - {"time"})))
                    latest[key] = record
        return sorted(latest.values(), key=lambda r: (r["stage"], r["step"]))


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


class RunDir:
    """Paths and bookkeeping of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(self.root / "metrics.jsonl")

    def stage(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dataset_path(self, name: str) -> Path:
        return self.root / name / "dataset"

    def is_done(self, name: str) -> bool:
        return (self.root / name / "DONE").is_file()

    def mark_done(self, name: str, info: dict | None = None) -> None:
        atomic_write_json(self.root / name / "DONE", info or {})

    def shards(self, name: str) -> Shards:
        return Shards(self.stage(name))
