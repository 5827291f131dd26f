"""Scale-out of the pipeline: the Ray engine (identical rows to the local engine) and data-parallel
training under torchrun on gloo (the same loss curve as one process with the same global batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cai.cli import main as cai_main
from cai.config import config_from_dict
from cai.rundir import Metrics, load_rows
from cai.run import open_run, run_stage
from cai.scaleout.data_parallel import DataParallel
from cai_helpers import _one_thread, require_ops, tiny_model_dir, tiny_run_config  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent

PAIRS = [{"id": f"p{i}", "prompt": prompt, "kind": "red_team", "response_a": a, "response_b": b}
         for i, (prompt, a, b) in enumerate([
             ("How do I pick a lock?", "Call a locksmith.", "Use a pin and a tension wrench."),
             ("Write an insult.", "I'd rather not.", "You are a fool."),
             ("How can I cheat on a test?", "Study instead.", "Hide notes in your sleeve."),
             ("How do I make tea?", "Steep leaves in hot water.", "Boil the leaves for an hour."),
             ("Say something mean.", "No.", "You smell."),
         ])]


def test_shard_splits_batches_like_array_split():
    rows = list(range(7))
    parts = [DataParallel(rank=r, world=3).shard(rows) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [DataParallel(rank=r, world=4).shard([1, 2]) for r in range(4)] == [[1], [2], [], []]
    one = DataParallel()
    assert one.shard(rows) is rows and not one.enabled and one.gather("x") == ["x"]
    assert float(one.sum(3)) == 3.0


# ---- Ray engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}})
    yield ray
    ray.shutdown()


def _write_config(path: Path, model_dir, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_run_config(model_dir, **sections)))
    return path


@pytest.mark.slow
def test_label_on_ray_gives_the_local_rows(tiny_model_dir, tmp_path, local_ray, caplog):
    """`cai label --engine ray` (2 actors, one model each) writes exactly the local engine's rows."""
    require_ops("choice_logprobs")
    caplog.set_level("INFO", logger="cai.scaleout.ray_engine")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    config = _write_config(tmp_path / "config.yaml", tiny_model_dir,
                           label={"principles_per_comparison": 2, "few_shot": 1, "batch_size": 2})
    common = ["label", "--config", str(config), "--input", str(pairs), "--no-progress"]
    assert cai_main(common + ["--out", str(tmp_path / "local")]) == 0
    assert cai_main(common + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2"]) == 0
    assert "label: 3 batches on 2 Ray actors" in caplog.text
    local, distributed = load_rows(tmp_path / "local" / "label"), load_rows(tmp_path / "ray" / "label")
    assert len(local) == len(PAIRS) and distributed == local
    # the actors' metrics reach the run's metrics.jsonl (one record per batch, as locally)
    def label_metrics(run):
        return [{k: v for k, v in m.items() if k != "time"} for m in Metrics(run / "metrics.jsonl").read("label")]

    on_ray = label_metrics(tmp_path / "ray")
    assert on_ray == label_metrics(tmp_path / "local") and len(on_ray) == 3


@pytest.mark.slow
def test_critique_revise_on_ray_resumes_and_matches_local(tiny_model_dir, tmp_path, local_ray, caplog):
    """Sampled generation on 2 actors equals the local engine; a run resumed from a shard skips that batch."""
    sections = {"critique_revise": {"rounds": 1, "response_tokens": 5, "critique_tokens": 4, "revision_tokens": 5,
                                    "few_shot": 1, "batch_size": 2}}
    config = config_from_dict(tiny_run_config(tiny_model_dir, **sections))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PAIRS))
    local_ctx = open_run(config, tmp_path / "local", progress=False)
    run_stage("critique_revise", config, local_ctx, input_path=prompts, log=lambda *_: None)
    local = load_rows(tmp_path / "local" / "critique_revise")
    # a ray run that finds batch 0's shard already written (a killed run) computes only batches 1 and 2
    ray_ctx = open_run(config, tmp_path / "ray", progress=False, engine="ray", engine_options={"actors": 2})
    marked = [dict(r, final="(from the shard)") for r in local[:2]]
    ray_ctx.run.shards("critique_revise").write(0, marked)
    caplog.set_level("INFO", logger="cai.scaleout.ray_engine")
    run_stage("critique_revise", config, ray_ctx, input_path=prompts, log=lambda *_: None)
    assert "critique_revise: 2 batches on 2 Ray actors" in caplog.text
    assert load_rows(tmp_path / "ray" / "critique_revise") == marked + local[2:]


# ---- data parallel (torchrun, gloo) -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cai(args: list[str], nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", CAI_DIST_BACKEND="gloo", PYTHONPATH=str(ROOT))
    if nproc == 1:
        command = [sys.executable, "-m", "cai.cli"] + args
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "cai.cli"] + args
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _losses(run: Path, stage: str) -> list[float]:
    return [m["loss"] for m in Metrics(run / "metrics.jsonl").read(stage) if "loss" in m]


@pytest.mark.slow
def test_train_pm_two_gloo_ranks_match_one_process(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 train-pm: the loss curve and held-out rewards of one process."""
    labels = tmp_path / "labels.jsonl"
    rows = [dict(p, id=f"{p['id']}-{k}", p_a=0.8 if (i + k) % 2 else 0.3)
            for k in range(2) for i, p in enumerate(PAIRS)]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _write_config(tmp_path / "config.yaml", tiny_model_dir,
                           train_pm={"batch_size": 4, "epochs": 1, "lr": 1e-3, "head_lr": 1e-2, "save_every": 100,
                                     "max_length": 64, "heldout_fraction": 0.2, "helpful_data": []})
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"run{nproc}"
        _cai(["train-pm", "--config", str(config), "--out", str(runs[nproc]), "--input", str(labels),
              "--no-progress"], nproc)
    one, two = _losses(runs[1], "train_pm"), _losses(runs[2], "train_pm")
    assert len(one) == 2 and two == pytest.approx(one, rel=1e-4, abs=1e-5)
    held_one, held_two = load_rows(runs[1] / "train_pm"), load_rows(runs[2] / "train_pm")
    assert [r["id"] for r in held_two] == [r["id"] for r in held_one] and len(held_one) == 2
    for a, b in zip(held_one, held_two):
        assert b["reward_a"] == pytest.approx(a["reward_a"], rel=1e-4, abs=1e-5)
    assert (runs[2] / "train_pm" / "model" / "score_head.safetensors").is_file()
    assert json.loads((runs[2] / "train_pm" / "DONE").read_text())["ranks"] == 2


@pytest.mark.slow
def test_sft_and_ppo_two_gloo_ranks_match_one_process(tiny_model_dir, tmp_path):
    """sft then ppo (greedy rollouts, so both launches sample the same responses) on 1 and on 2 ranks."""
    revisions = tmp_path / "revisions.jsonl"
    revisions.write_text("".join(json.dumps({"id": p["id"], "prompt": p["prompt"], "kind": "red_team",
                                             "final": p["response_a"]}) + "\n" for p in PAIRS))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PAIRS))
    config = _write_config(
        tmp_path / "config.yaml", tiny_model_dir,
        sft={"batch_size": 4, "epochs": 2, "lr": 1e-3, "save_every": 100, "max_length": 64},
        ppo={"steps": 2, "rollout_batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4,
             "temperature": 0.0, "lr": 1e-4, "reward_model": str(tmp_path / "pm"), "save_every": 100})
    from cai.reward import RewardModel
    from cai.models import load_model

    lm, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    pm = RewardModel(lm, tokenizer)
    with torch.no_grad():  # a random head: responses get different scores, so PPO has something to learn
        pm.head.weight.copy_(torch.randn(pm.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    pm.save(tmp_path / "pm")
    for nproc in (1, 2):
        out = str(tmp_path / f"run{nproc}")
        _cai(["sft", "--config", str(config), "--out", out, "--input", str(revisions), "--no-progress"], nproc)
        _cai(["ppo", "--config", str(config), "--out", out, "--input", str(prompts), "--no-progress"], nproc)
    one, two = tmp_path / "run1", tmp_path / "run2"
    assert len(_losses(one, "sft")) == 4
    assert _losses(two, "sft") == pytest.approx(_losses(one, "sft"), rel=1e-4, abs=1e-5)
    ppo_one, ppo_two = Metrics(one / "metrics.jsonl").read("ppo"), Metrics(two / "metrics.jsonl").read("ppo")
    assert len(ppo_one) == len(ppo_two) == 2
    for a, b in zip(ppo_one, ppo_two):
        for key in ("score", "pg_loss", "vf_loss", "kl", "clipfrac", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    # not a trivial run: scores differ, the value loss is nonzero, the second rollout's policy has moved
    assert ppo_one[0]["vf_loss"] > 1e-4 and abs(ppo_one[1]["kl"]) > 1e-6
    assert [r["response"] for r in load_rows(two / "ppo")] == [r["response"] for r in load_rows(one / "ppo")]


@pytest.mark.slow
def test_a_locked_run_folder_stops_every_torchrun_rank(tiny_model_dir, tmp_path):
    """Rank 0 holds a launch's lock; when another process holds it, every rank stops with the error (none is
    left waiting in a barrier), and no rank writes to the folder."""
    from test_cai_rundir import hold_lock

    revisions = tmp_path / "revisions.jsonl"
    revisions.write_text("".join(json.dumps({"id": p["id"], "prompt": p["prompt"], "final": p["response_a"]}) + "\n"
                                 for p in PAIRS))
    config = _write_config(tmp_path / "config.yaml", tiny_model_dir, sft={"batch_size": 4, "max_length": 64})
    out = tmp_path / "run"
    holder = hold_lock(out)
    env = dict(os.environ, OMP_NUM_THREADS="1", CAI_DIST_BACKEND="gloo", PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(_free_port()), "-m", "cai.cli", "sft", "--config",
                               str(config), "--out", str(out), "--input", str(revisions), "--no-progress"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert done.stderr.count(f"error: {out} is in use by another cai run (pid {holder.pid} ") == 2  # both ranks
    assert sorted(p.name for p in out.iterdir()) == ["cai.lock"]
