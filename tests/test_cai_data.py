"""Prompt sets and eval files: builtin sets, local JSONL / JSON / CSV, HF datasets, the run folder helpers."""

from __future__ import annotations

import json

import pytest

from cai.data import BUILTIN, PromptsConfig, load_mc_questions, load_prompts, resolve_path
from cai.rundir import Metrics, Shards, atomic_write_text, load_rows, save_dataset


def test_builtin_sets():
    rows = load_prompts(PromptsConfig())
    kinds = {r["kind"] for r in rows}
    assert kinds == {"red_team", "helpful"} and len(rows) >= 48
    assert len({r["id"] for r in rows}) == len(rows)
    limited = load_prompts(PromptsConfig(limit_per_source=3))
    assert [r["kind"] for r in limited] == ["red_team"] * 3 + ["helpful"] * 3
    questions = load_mc_questions("builtin:harmless_mc")
    assert len(questions) >= 16 and all(q.prompt.endswith("The answer is:") for q in questions)
    with pytest.raises(ValueError, match="unknown builtin"):
        resolve_path("builtin:nope")


def test_local_files_and_transcripts(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Plain prompt?"}) + "\n" +
                     json.dumps({"chosen": "\n\nHuman: First turn?\n\nAssistant: ok\n\nHuman: second"}) + "\n")
    csv = tmp_path / "b.csv"
    csv.write_text("prompt,kind\nHow do I fold a shirt?,helpful\n")
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"id": "x1", "prompt": "\n\nHuman: Raw prompt\n\nAssistant:"}]))
    rows = load_prompts(PromptsConfig(sources=[str(jsonl), str(csv), str(js)]))
    assert [r["prompt"] for r in rows] == ["Plain prompt?", "First turn?", "How do I fold a shirt?", "Raw prompt"]
    assert [r["kind"] for r in rows] == ["red_team", "red_team", "helpful", "red_team"]
    assert rows[-1]["id"] == "x1" and rows[0]["id"] == "a-00000"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt field"}) + "\n")
    with pytest.raises(ValueError, match="no 'prompt' field"):
        load_prompts(PromptsConfig(sources=[str(bad)]))
    with pytest.raises(FileNotFoundError):
        load_prompts(PromptsConfig(sources=[str(tmp_path / "missing.jsonl")]))


def test_hf_dataset_from_a_local_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?"}) + "\n" for i in range(3)))
    rows = load_prompts(PromptsConfig(sources=[f"hf:{folder}:train"]))
    assert [r["prompt"] for r in rows] == ["Q0?", "Q1?", "Q2?"]


def test_mc_file_errors(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": "x", "corrects": []}) + "\n")
    with pytest.raises(ValueError, match=r"e.jsonl line 1: missing field\(s\) \['incorrects'\]"):
        load_mc_questions(str(path))
    assert BUILTIN["harmless_mc"].is_file()


def test_rundir_helpers(tmp_path):
    atomic_write_text(tmp_path / "a" / "f.txt", "hello")
    assert (tmp_path / "a" / "f.txt").read_text() == "hello" and len(list((tmp_path / "a").iterdir())) == 1
    rows = [{"id": "1", "xs": ["a"]}, {"id": "2", "xs": []}]
    save_dataset(rows, tmp_path / "ds")
    save_dataset(rows[:1], tmp_path / "ds")  # replaces the older one atomically
    assert load_rows(tmp_path / "ds") == rows[:1]
    shards = Shards(tmp_path / "stage")
    shards.write(0, rows)
    shards.write(1, [{"id": "3", "xs": ["b"]}])
    assert shards.done(1) and not shards.done(2) and [r["id"] for r in shards.read_all(2)] == ["1", "2", "3"]
    metrics = Metrics(tmp_path / "metrics.jsonl")
    metrics.log("sft", 0, loss=2.0)
    metrics.log("sft", 0, loss=1.5)  # a resumed stage logs a step again: the last record wins
    metrics.log("sft", 1, loss=1.0)
    with open(metrics.path, "a") as f:
        f.write('{"stage": "sft", "st')  # a line cut by a kill
    assert [(m["step"], m["loss"]) for m in metrics.read("sft")] == [(0, 1.5), (1, 1.0)]
