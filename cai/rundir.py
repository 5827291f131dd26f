"""The run folder: atomic writes, self-checking shards and datasets, the run lock, metrics.jsonl.

Layout of a run folder:
    config.yaml                 the resolved run config
    cai.lock                    held by the process running stages here (flock); names it (pid, host, command)
    metrics.jsonl               one JSON object per line: {"stage", "step", "time", <metric>: value, ...}
    <stage>/shards/plan.json    the batches a stage in progress works through (item ids, batch size, config)
    <stage>/shards/00007.jsonl  rows of finished batch 7 of a stage that is still running
    <stage>/dataset/            the stage's output, a `datasets` dataset (save_to_disk), written atomically
    <stage>/model/ ...          checkpoints (safetensors)
    <stage>/DONE                written last: the stage is finished and is skipped on re-run
    report.md, plots/*.png

Every file is written to a temporary name in the same folder and moved into place with os.replace, so a
kill leaves either the old state or the new one, never half a file. A batch is finished once its shard
exists; a resumed stage skips finished batches (their seeds depend only on the batch, so the redone work
is identical to what an uninterrupted run does).

Files check themselves, so damage (a line dropped or duplicated, an emptied or edited file, a truncated
arrow file) is an error naming the file instead of rows silently lost or doubled:
  * a shard's first line is a header {"format", "rows", "sha256"} over the rows that follow (one file,
    one atomic write);
  * a dataset folder, and a training checkpoint folder, hold cai_manifest.json: the row count and the
    size and sha256 of every file, written into the folder before it is moved into place.
`DamagedRunError` lists the damaged files and what to do (`--repair` redoes just those batches).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import CaiWarning


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


class DamagedRunError(RuntimeError):
    """Files of a run folder that fail their checks. `problems`: [(path, what is wrong)]; `hint`: what to do."""

    def __init__(self, problems: list[tuple[Path, str]], hint: str):
        self.problems, self.hint = list(problems), hint
        super().__init__("\n".join([f"{path}: {problem}" for path, problem in self.problems] + [hint]))

    def __reduce__(self):  # travels between processes (Ray, torch.distributed) with its fields
        return type(self), (self.problems, self.hint)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "cai_manifest.json"


def write_manifest(folder: Path, rows: int) -> None:
    """Record `rows` and the size and sha256 of every file of `folder` (a staging folder, before it is moved
    into place: the manifest travels with the files in the same rename)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                           "sha256": _sha256_file(path)}
    atomic_write_json(folder / MANIFEST, {"rows": rows, "files": files})


def check_manifest(folder: Path) -> tuple[int | None, list[tuple[Path, str]]]:
    """(rows recorded, [(file, problem)]) of a folder written with `write_manifest`."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, [(path, "missing: the folder was damaged, or written by a cai without checksums")]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, rows = manifest["files"], manifest["rows"]
    except (ValueError, KeyError, TypeError) as err:
        return None, [(path, f"damaged ({err})")]
    problems = []
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            problems.append((file, "missing"))
        elif file.stat().st_size != expected["bytes"]:
            problems.append((file, f"{file.stat().st_size} bytes, the manifest records {expected['bytes']}"))
        elif _sha256_file(file) != expected["sha256"]:
            problems.append((file, "checksum mismatch (the file was changed after it was written)"))
    return rows, problems


def save_dataset(rows: list[dict], target: str | os.PathLike):
    """Write rows as a `datasets` dataset folder (with its manifest) atomically; returns the Dataset."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar per small save is noise next to the stages' own bars
    target = Path(target)
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({})
    staging = staging_dir(target)
    try:
        dataset.save_to_disk(str(staging))
        write_manifest(staging, len(rows))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset


def load_rows(source: str | os.PathLike) -> list[dict]:
    """Rows of a dataset folder written by `save_dataset` (or of a stage folder holding one).

    The folder is checked against its manifest (files, checksums, row count); a folder without one (written by
    another tool, or by a cai before checksums) is read as it is. Damage raises DamagedRunError naming the file.
    """
    from datasets import load_from_disk

    source = Path(source)
    if (source / "dataset").is_dir():
        source = source / "dataset"
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such dataset folder")
    hint = f"the dataset {source} is damaged: recompute it (see --repair in `cai run --help`)"
    expected = None
    if (source / MANIFEST).is_file():
        expected, problems = check_manifest(source)
        if problems:
            raise DamagedRunError(problems, hint)
    try:
        rows = load_from_disk(str(source)).to_list()
    except Exception as err:  # arrow / JSON errors of a folder without a manifest
        raise DamagedRunError([(source, f"cannot be read as a dataset ({type(err).__name__}: {err})")], hint) from err
    if expected is not None and len(rows) != expected:
        raise DamagedRunError([(source, f"{len(rows)} rows, the manifest records {expected}")], hint)
    return rows


SHARD_FORMAT = "cai-shard-1"


def shard_text(rows: list[dict]) -> str:
    """A shard file: a header line {"format", "rows", "sha256" of the row lines}, then one JSON row per line."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    header = {"format": SHARD_FORMAT, "rows": len(rows), "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()}
    return json.dumps(header) + "\n" + body


def parse_shard(data: bytes) -> list[dict]:
    """The rows of a shard file's bytes; ValueError saying what is wrong when it fails its header."""
    if not data:
        raise ValueError("empty file")
    first, _, body = data.partition(b"\n")
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != SHARD_FORMAT:
        raise ValueError("no shard header on the first line (damaged, or written by a cai without checksums)")
    lines = body.splitlines()
    if len(lines) != header.get("rows") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise ValueError(f"the header records {header.get('rows')} rows, the file has {len(lines)} lines"
                         + ("" if len(lines) != header.get("rows") else " and a different checksum")
                         + " (lines dropped, duplicated or edited)")
    return [json.loads(line) for line in lines]


class Shards:
    """Per-batch JSONL shards of a stage in progress: batch i is done once shards/i.jsonl exists."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder) / "shards"

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.jsonl"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, rows: list[dict]) -> None:
        atomic_write_text(self.path(index), shard_text(rows))
        # CAI_DEBUG_SHARD_DELAY=<stage>:<seconds> pauses after each shard of that stage, so the resume
        # tests can kill a run between two shards
        stage, _, delay = os.environ.get("CAI_DEBUG_SHARD_DELAY", "").partition(":")
        if delay and stage == self.folder.parent.name:
            time.sleep(float(delay))

    def problem(self, index: int) -> str | None:
        """What is wrong with shard `index` (None: it is sound)."""
        try:
            parse_shard(self.path(index).read_bytes())
        except (OSError, ValueError) as err:
            return str(err)
        return None

    def damaged(self, count: int) -> list[tuple[int, str]]:
        """[(index, problem)] of the existing shards among the first `count` that fail their header."""
        found = []
        for i in range(count):
            if self.done(i):
                problem = self.problem(i)
                if problem is not None:
                    found.append((i, problem))
        return found

    def set_aside(self, index: int) -> Path:
        """Move a damaged shard out of the way (kept as <name>.damaged until the stage finishes)."""
        aside = self.path(index).with_name(self.path(index).name + ".damaged")
        os.replace(self.path(index), aside)
        return aside

    def read(self, index: int) -> list[dict]:
        try:
            return parse_shard(self.path(index).read_bytes())
        except ValueError as err:
            raise DamagedRunError([(self.path(index), str(err))],
                                  "re-run with --repair to redo this batch") from None

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


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (only knowable on this host)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    started = holder.get("start")
    return started is None or _process_start(pid) in (None, started)


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {when}: {holder.get('command', '?')}"


class RunLock:
    """<run>/cai.lock: one process at a time runs stages in a run folder.

    The lock is an flock on the file (the kernel drops it when the process dies, however it dies); the file
    also names its holder (pid, host, start time, command) for the messages. Acquiring a lock that a killed
    process left behind succeeds with a warning naming that process; a live holder is an error. The lock is
    per process and re-entrant: several `open_run`s of one folder in one process share it. Under torchrun
    only rank 0 takes it (cai.run.open_run). Released at exit (the file stays, emptied: deleting a locked
    file would let two processes lock two different files of the same name).
    """

    _held: dict[str, "RunLock"] = {}

    def __init__(self, root: Path):
        self.path = Path(root) / "cai.lock"
        self.fd: int | None = None

    @classmethod
    def acquire(cls, root: Path) -> "RunLock":
        """The folder's lock for this process; RunLockedError if another live process holds it, a CaiWarning
        when it is taken over from a process that died holding it."""
        key = str(Path(root).resolve())
        if key not in cls._held:
            lock = cls(root)
            warning = lock._take()
            cls._held[key] = lock
            if warning:
                warnings.warn(warning, CaiWarning, stacklevel=3)
        return cls._held[key]

    def _take(self) -> str | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                raise RunLockedError(self._in_use(self._holder(fd))) from None
            except (ImportError, OSError):  # no flock here (platform or filesystem): the pid check decides
                pass
            holder = self._holder(fd)
            if holder and _holder_alive(holder):  # an flock the filesystem does not enforce
                raise RunLockedError(self._in_use(holder))
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "time": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if holder:
            return (f"{self.path}: took over the lock of a run that ended without releasing it (killed?): "
                    f"{_describe(holder)}")
        return None

    def _in_use(self, holder: dict) -> str:
        who = _describe(holder) if holder else "another process"
        return (f"{self.path.parent} is in use by another cai run ({who}); wait for it to finish or use another "
                f"--out. If that process is gone (e.g. on another machine), delete {self.path}")

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            data = os.pread(fd, 65536, 0)
            holder = json.loads(data) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty = released cleanly (a holder that is still named was killed)
        finally:
            os.close(self.fd)
            self.fd = None
            RunLock._held = {k: v for k, v in RunLock._held.items() if v is not self}

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held.values()):
            lock.release()


atexit.register(RunLock.release_all)


class RunDir:
    """Paths and bookkeeping of one run folder."""

    def __init__(self, root: str | os.PathLike):
        if not str(root).strip():
            raise ValueError("the run folder (--out) is empty; give a folder path")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: the run folder (--out) is a file, not a folder")
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

    def done_info(self, name: str) -> dict:
        """The stage's DONE record (rows, seconds, resumed, ranks); {} if it has not finished."""
        path = self.root / name / "DONE"
        if not path.is_file():
            return {}
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise DamagedRunError([(path, f"not valid JSON ({err})")],
                                  "re-run with --repair to recompute the stage") from None
        return info if isinstance(info, dict) else {}

    def dataset_problems(self, name: str) -> list[tuple[Path, str]]:
        """[(file, problem)] of a finished stage: its DONE record and its dataset folder against the manifest."""
        problems = []
        try:
            self.done_info(name)
        except DamagedRunError as err:
            problems += err.problems
        folder = self.dataset_path(name)
        if not folder.is_dir():
            return problems + [(folder, "missing, though the stage is marked done")]
        return problems + (check_manifest(folder)[1] if (folder / MANIFEST).is_file() else [])

    def undo(self, name: str) -> Path | None:
        """Mark a finished stage unfinished, its (damaged) dataset moved aside; returns where it went."""
        (self.root / name / "DONE").unlink(missing_ok=True)
        dataset = self.dataset_path(name)
        if not dataset.exists():
            return None
        aside = dataset.with_name(f"dataset.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(dataset, aside)
        return aside

    def lock(self) -> RunLock:
        """Take the folder's lock (see RunLock)."""
        return RunLock.acquire(self.root)

    def shards(self, name: str) -> Shards:
        return Shards(self.stage(name))
