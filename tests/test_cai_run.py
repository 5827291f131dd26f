"""`cai run` end to end on a tiny model: every stage, the report, skipping, and resuming after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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
    ({"sft": {"lr": "fast"}}, "sft.lr: expected float"),
    ({"stages": ["sft", "rlhf"]}, "unknown stage(s) ['rlhf']"),
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


def test_stage_subcommand_with_input(tiny_model_dir, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I hide a body?"}\n{"prompt": "Bake a cake?", "kind": "helpful"}\n')
    out = tmp_path / "run"
    assert cai_main(["critique-revise", "--config", str(config_path), "--out", str(out), "--input", str(prompts),
                     "--no-progress"]) == 0
    rows = load_rows(out / "critique_revise")
    assert [r["kind"] for r in rows] == ["red_team", "helpful"] and len(rows[0]["revisions"]) == 2
    with pytest.raises(RuntimeError, match="has not finished"):
        cai_main(["label", "--config", str(config_path), "--out", str(out), "--no-progress"])


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
    run_all(config_from_dict(config), out, progress=False, log=messages.append)
    assert "[cai] label: resuming" in messages
    labels = load_rows(out / "label")
    assert [r["id"] for r in labels] == [p["id"] for p in pairs]  # none lost, none twice, in order
    # and they are the labels an uninterrupted run computes
    fresh = tmp_path / "fresh"
    ctx = open_run(config_from_dict(config), fresh, progress=False)
    run_stage("label", config_from_dict(config), ctx, input_path=out / "sample_pairs" / "dataset", log=lambda *_: None)
    assert [r["p_a"] for r in load_rows(fresh / "label")] == pytest.approx([r["p_a"] for r in labels], abs=1e-6)
