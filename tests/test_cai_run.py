"""`cai run` end to end on a tiny model: every stage, the report, skipping, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai import CaiWarning
from cai.cli import main as cai_main
from cai.config import ConfigError, config_from_dict, load_config
from cai.rundir import load_rows
from cai.run import RunConfigMismatch, open_run, run_all, run_stage
from cai_helpers import PIPELINE_OPS, _one_thread, require_ops, tiny_model_dir, tiny_run_config  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_presets_load():
    tiny, paper = load_config("tiny"), load_config("paper")
    assert tiny.model == "embedded" and tiny.critique_revise.rounds >= 1
    assert paper.critique_revise.rounds == 4 and paper.critique_revise.temperature == 1.0
    assert paper.label.chain_of_thought and paper.label.clamp == [0.4, 0.6]
    assert load_config("tiny", ["label.principles_per_comparison=5", "ppo.kl_coef=0.2"]).label.principles_per_comparison == 5


@pytest.mark.parametrize("data, message", [
    ({"label": {"principals": 2}}, "label: unknown key(s) ['principals']"),
    ({"sft": {"lr": "fast"}}, "sft.lr: expected a number, got 'fast'"),
    ({"stages": ["sft", "rlhf"]}, "stages[1]: must be one of 'critique_revise', "),
    ({"seed": None}, "seed: may not be null"),
])
def test_config_errors(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_full_run_report_and_skip(tiny_model_dir, tmp_path):
    require_ops(*PIPELINE_OPS)
    config = config_from_dict(tiny_run_config(tiny_model_dir))
    out = tmp_path / "run"
    report = run_all(config, out, progress=False, log=lambda *_: None)
    text = report.read_text()
    for section in ("## Stages", "## Critique and revision", "## Supervised fine-tuning", "## AI preference labels",
                    "## Preference model", "## RL from AI feedback (PPO)", "## Evaluation",
                    "### Harmlessness and helpfulness", "### Revision curves", "### Multiple-choice evals"):
        assert section in text, section
    assert "not run" not in text and "nan" not in text
    for plot in ("sft_loss", "label_hist", "pm_loss", "ppo_reward", "ppo_kl", "elo_harmless_vs_helpful",
                 "elo_by_ppo_iteration", "revision_curves", "hhh_accuracy"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    for stage in ("critique_revise", "sft", "sample_pairs", "label", "train_pm", "ppo", "evaluate"):
        assert (out / stage / "DONE").is_file() and not (out / stage / "shards").exists()
    assert (out / "sft" / "model" / "model.safetensors").is_file()
    evaluation = load_rows(out / "evaluate" / "dataset")
    assert {r["section"] for r in evaluation} == {"setup", "sample", "judge", "revision", "mc_file", "mc"}
    assert "| RL-CAI @ 1 | 1 |" in text and "| harmlessness | direct | 2 |" in text  # snapshot, ablation
    assert "| harmless | AI (soft) |" in text and "| helpful | human (hard) |" in text  # the PM's two accuracies
    # a finished run is skipped stage by stage
    messages = []
    run_all(config, out, progress=False, log=messages.append)
    assert all("skipped" in m for m in messages) and len(messages) == 7
    # a different config is refused
    with pytest.raises(RunConfigMismatch, match="differs in: seed"):
        open_run(config_from_dict(tiny_run_config(tiny_model_dir, seed=1)), out)


def test_stage_subcommand_with_input(tiny_model_dir, tmp_path, capsys):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I hide a body?"}\n{"prompt": "Bake a cake?", "kind": "helpful"}\n')
    out = tmp_path / "run"
    assert cai_main(["critique-revise", "--config", str(config_path), "--out", str(out), "--input", str(prompts),
                     "--no-progress"]) == 0
    rows = load_rows(out / "critique_revise")
    assert [r["kind"] for r in rows] == ["red_team", "helpful"] and len(rows[0]["revisions"]) == 2
    capsys.readouterr()
    assert cai_main(["label", "--config", str(config_path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stage label reads the output of sample_pairs, which has not finished")
    assert "Traceback" not in err and "--debug" not in err  # cai's own message: nothing to add
    with pytest.raises(RuntimeError, match="has not finished"):  # --debug: the exception itself
        cai_main(["label", "--config", str(config_path), "--out", str(out), "--no-progress", "--debug"])


def test_sigkill_during_label_then_resume(tiny_model_dir, tmp_path):
    """Kill `cai run` once a label shard exists; the re-run finishes with every pair labelled exactly once."""
    require_ops(*PIPELINE_OPS)
    config = tiny_run_config(tiny_model_dir, stages=["critique_revise", "sft", "sample_pairs", "label"])
    config["label"] = dict(config["label"], batch_size=1)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CAI_DEBUG_SHARD_DELAY="label:2")
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", "run", "--config", str(config_path), "--out", str(out),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard = out / "label" / "shards" / "00000.jsonl"
    deadline = time.time() + 240
    while not first_shard.exists():
        if proc.poll() is not None:
            pytest.fail(f"cai run exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no label shard within 240 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "label" / "DONE").exists()
    shards_before = sorted(p.name for p in (out / "label" / "shards").glob("*.jsonl"))
    pairs = load_rows(out / "sample_pairs")
    assert 1 <= len(shards_before) < len(pairs)

    messages = []
    with pytest.warns(CaiWarning, match=f"took over the lock of a run that ended .*pid {proc.pid} "):
        run_all(config_from_dict(config), out, progress=False, log=messages.append)
    assert "[cai] label: resuming" in messages
    labels = load_rows(out / "label")
    assert [r["id"] for r in labels] == [p["id"] for p in pairs]  # none lost, none twice, in order
    # and they are the labels an uninterrupted run computes
    fresh = tmp_path / "fresh"
    ctx = open_run(config_from_dict(config), fresh, progress=False)
    run_stage("label", config_from_dict(config), ctx, input_path=out / "sample_pairs" / "dataset", log=lambda *_: None)
    assert [r["p_a"] for r in load_rows(fresh / "label")] == pytest.approx([r["p_a"] for r in labels], abs=1e-6)


# ---- damaged run folders (issue 13) ---------------------------------------------------------------

PAIRS = [{"id": f"p{i}", "prompt": f"Can you help me with task {i}?", "kind": "red_team",
          "response_a": "Sure, here is a safe way to do it.", "response_b": "No. Go away."} for i in range(6)]


def _label_setup(tiny_model_dir, tmp_path):
    """A config (label batches of 2) and a pairs file: 3 label batches."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, label={"principles_per_comparison": 1, "few_shot": 1,
                                                                            "batch_size": 2})))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return ["label", "--config", str(config), "--input", str(pairs), "--no-progress"]


def _count_calls(monkeypatch, fail_at: int | None = None) -> list:
    """Count label's score_options calls (one per batch); the `fail_at`-th raises (a run killed there)."""
    from cai import feedback as label_module  # label's questions are asked by cai.feedback.Comparer

    real, calls = label_module.score_options, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # stands for the kill: the CLI stops, the shards so far stay
        return real(*args, **kwargs)

    monkeypatch.setattr(label_module, "score_options", counted)
    return calls


@pytest.mark.parametrize("how", ["a line dropped", "an empty file", "lines duplicated"])
def test_damaged_shard_stops_the_resume_and_repair_redoes_that_batch(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                     how):
    """Issue 13: a damaged shard was accepted on resume (11 of 12 rows, or 8, or 16 with duplicate ids)."""
    from test_cai_rundir import damage

    require_ops("choice_logprobs")
    command = _label_setup(tiny_model_dir, tmp_path)
    assert cai_main(command + ["--out", str(tmp_path / "reference")]) == 0
    reference = load_rows(tmp_path / "reference" / "label")
    out = tmp_path / "run"
    _count_calls(monkeypatch, fail_at=3)
    assert cai_main(command + ["--out", str(out)]) == 130  # killed in the third batch
    shard = out / "label" / "shards" / "00000.jsonl"
    damage(shard, how)
    capsys.readouterr()

    calls = _count_calls(monkeypatch)
    assert cai_main(command + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard}: ") and "Traceback" not in err
    assert "error: 1 of the 3 batches of label have damaged shards: re-run with --repair" in err
    assert calls == [] and not (out / "label" / "DONE").exists()

    assert cai_main(command + ["--out", str(out), "--repair"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {shard}: " in err and "batch 0 is redone (--repair)" in err
    assert len(calls) == 2  # the damaged batch and the one never finished; batch 1 was read from its shard
    assert load_rows(out / "label") == reference  # every pair once, in order, the uninterrupted labels


def test_duplicated_rows_are_not_marked_done(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A shard copied over another passes its own checksum; the unique-id check before DONE catches it."""
    require_ops("choice_logprobs")
    command = _label_setup(tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    _count_calls(monkeypatch, fail_at=3)
    assert cai_main(command + ["--out", str(out)]) == 130
    shards = out / "label" / "shards"
    (shards / "00001.jsonl").write_bytes((shards / "00000.jsonl").read_bytes())
    capsys.readouterr()
    _count_calls(monkeypatch)
    assert cai_main(command + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {out / 'label'}: rows 0 and 2 have the same id 'p0'" in err
    assert "so the stage was not marked done" in err
    assert not (out / "label" / "DONE").exists() and (shards / "00000.jsonl").is_file()


def test_damaged_dataset_of_a_finished_stage(tiny_model_dir, tmp_path, capsys):
    """A finished stage's dataset is checked on the next run; --repair recomputes it (the same rows)."""
    config = tiny_run_config(tiny_model_dir, stages=["critique_revise"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    command = ["run", "--config", str(path), "--out", str(out), "--no-progress"]
    assert cai_main(command) == 0
    rows = load_rows(out / "critique_revise")
    arrow = next((out / "critique_revise" / "dataset").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-10])
    capsys.readouterr()
    assert cai_main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {arrow}: ") and "re-run with --repair to recompute them" in err
    assert cai_main(command + ["--repair"]) == 0
    assert "warning: " in capsys.readouterr().err
    assert load_rows(out / "critique_revise") == rows
    assert list((out / "critique_revise").glob("dataset.damaged-*"))  # kept for a look, not deleted


def test_empty_inputs_are_errors(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cai_main(["critique-revise", "--config", str(config), "--out", str(tmp_path / "a"), "--input", str(empty),
                     "--no-progress"]) == 1
    assert capsys.readouterr().err == f"error: --input {empty}: no rows\n"
    assert not (tmp_path / "a" / "critique_revise" / "DONE").exists()
    assert cai_main(["run", "--config", str(config), "--out", str(tmp_path / "b"), "--no-progress",
                     "--set", f"prompts.sources=[builtin:red_team,{empty}]"]) == 1
    assert capsys.readouterr().err == f"error: {empty}: no rows (an empty prompt source)\n"
    duplicated = tmp_path / "pairs.jsonl"
    duplicated.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:2] + PAIRS[:1]))
    assert cai_main(["label", "--config", str(config), "--out", str(tmp_path / "c"), "--input", str(duplicated),
                     "--no-progress"]) == 1
    assert "error: the input of label: rows 0 and 2 have the same id 'p0'" in capsys.readouterr().err


def test_second_run_on_a_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    from test_cai_rundir import hold_lock

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, stages=["critique_revise"])))
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        assert cai_main(["run", "--config", str(config), "--out", str(out), "--no-progress"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is in use by another cai run (pid {holder.pid} on ")
    assert not (out / "config.yaml").exists()
