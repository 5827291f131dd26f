"""Run folders check themselves (issue 13): shard headers, dataset and checkpoint manifests, the run lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cai import CaiWarning
from cai.rundir import (DamagedRunError, RunDir, RunLock, RunLockedError, Shards, check_manifest, load_rows,
                        save_dataset)
from cai.training import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"id": f"p{i}", "text": f"row {i}", "p_a": 0.25 * i} for i in range(4)]


def damage(path: Path, how: str) -> None:
    """Damage a shard the ways issue 13 found accepted on resume, and a few more."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text = {"a line dropped": "".join(lines[:-1]),
            "an empty file": "",
            "lines duplicated": "".join(lines + lines[1:]),
            "a row edited": "".join(lines).replace('"row 1"', '"row 7"'),
            "the header removed": "".join(lines[1:]),
            "the last line cut": "".join(lines)[:-7]}[how]
    path.write_text(text, encoding="utf-8")


DAMAGE = ["a line dropped", "an empty file", "lines duplicated", "a row edited", "the header removed",
          "the last line cut"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_shard_is_an_error_naming_the_file(tmp_path, how):
    shards = Shards(tmp_path / "label")
    shards.write(0, ROWS)
    shards.write(1, ROWS[:1])
    assert shards.read_all(2) == ROWS + ROWS[:1] and shards.damaged(2) == []
    damage(shards.path(0), how)
    with pytest.raises(DamagedRunError) as err:
        shards.read_all(2)
    assert str(err.value).startswith(f"{shards.path(0)}: ") and "--repair" in str(err.value)
    assert [index for index, _ in shards.damaged(2)] == [0]
    aside = shards.set_aside(0)
    assert not shards.done(0) and aside.is_file() and shards.read(1) == ROWS[:1]


def test_shard_of_no_rows_is_sound(tmp_path):
    shards = Shards(tmp_path / "evaluate")
    shards.write(0, [])
    assert shards.read(0) == [] and shards.damaged(1) == []


def test_dataset_manifest(tmp_path):
    folder = tmp_path / "label" / "dataset"
    save_dataset(ROWS, folder)
    assert load_rows(folder) == ROWS
    rows, problems = check_manifest(folder)
    assert rows == len(ROWS) and problems == []
    arrow = next(folder.glob("*.arrow"))
    with open(arrow, "r+b") as f:  # one byte flipped in the middle: same size, other content
        f.seek(arrow.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DamagedRunError, match=f"{arrow}: checksum mismatch"):
        load_rows(folder)
    save_dataset(ROWS, folder)
    (folder / "state.json").write_text("{")  # a damaged JSON file of the dataset
    with pytest.raises(DamagedRunError, match=r"state.json: \d+ bytes, the manifest records"):
        load_rows(folder)
    save_dataset(ROWS, folder)
    arrow.unlink()
    with pytest.raises(DamagedRunError, match=f"{arrow}: missing"):
        load_rows(tmp_path / "label")  # a stage folder reads its dataset


def test_dataset_without_manifest(tmp_path):
    """A dataset another tool wrote (no manifest) is read as it is; a damaged one is an error naming it."""
    from datasets import Dataset

    folder = tmp_path / "theirs"
    Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert load_rows(folder) == ROWS
    arrow = next(folder.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DamagedRunError, match=f"{folder}: cannot be read as a dataset"):
        load_rows(folder)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        load_rows(tmp_path / "nothing")


def test_checkpoint_manifest_and_repair(tmp_path):
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    checkpoint = Checkpoint(tmp_path / "sft")
    checkpoint.save(2, {"m": module}, optimizer, ROWS[:2])
    assert checkpoint.restore({"m": module}, optimizer)[:2] == (2, ROWS[:2])
    rows = checkpoint.folder / "rows.jsonl"
    rows.write_text(rows.read_text().splitlines(keepends=True)[0])  # a row lost
    with pytest.raises(DamagedRunError, match="rows.jsonl: .*the manifest records") as err:
        checkpoint.restore({"m": module}, optimizer)
    assert "--repair" in str(err.value)
    with pytest.warns(CaiWarning, match="damaged checkpoint discarded"):
        assert checkpoint.restore({"m": module}, optimizer, repair=True) == (0, [], {})
    assert not checkpoint.folder.exists()


def test_run_folder_path_is_checked(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        RunDir("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        RunDir(tmp_path / "file")


# ---- the lock -------------------------------------------------------------------------------------

HOLD = "import sys, time; from cai.rundir import RunDir; RunDir(sys.argv[1]).lock(); print('locked', flush=True); " \
       "time.sleep(120)"


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process that takes the run folder's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_and_takes_over_from_a_killed_one(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(RunLockedError, match=f"in use by another cai run \\(pid {holder.pid} on "):
            RunDir(folder).lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.warns(CaiWarning, match=f"took over the lock .* pid {holder.pid} "):
        lock = RunDir(folder).lock()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunDir(folder).lock() is lock  # re-entrant within one process, no second warning
    assert json.loads((folder / "cai.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (folder / "cai.lock").read_text() == ""  # released cleanly: the next run takes it without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunDir(folder).lock().release()


def test_lock_of_a_live_process_without_flock_is_still_refused(tmp_path, monkeypatch):
    """On a filesystem that does not enforce flock, the pid in the lock file still refuses a live holder."""
    folder = tmp_path / "run"
    folder.mkdir()
    me = {"pid": os.getppid(), "host": os.uname().nodename, "time": time.time(), "command": "cai run"}
    (folder / "cai.lock").write_text(json.dumps(me))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        RunDir(folder).lock()
    assert str(folder.resolve()) not in RunLock._held


def test_damaged_done_record(tmp_path):
    run = RunDir(tmp_path / "run")
    save_dataset(ROWS, run.dataset_path("label"))
    run.mark_done("label", {"rows": 4})
    assert run.done_info("label") == {"rows": 4} and run.dataset_problems("label") == []
    (run.root / "label" / "DONE").write_text('{"rows": ')
    with pytest.raises(DamagedRunError, match="label/DONE: not valid JSON"):
        run.done_info("label")
    assert [path.name for path, _ in run.dataset_problems("label")] == ["DONE"]
    aside = run.undo("label")
    assert not run.is_done("label") and load_rows(aside) == ROWS
