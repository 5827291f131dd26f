"""The stage table drives config, CLI, run order and the report; the training stages' shared optimizer-step loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cai.report
from cai.cli import build_parser
from cai.config import RunConfig, RunSettings, config_from_dict, config_to_dict
from cai.constitution import load_constitution
from cai.rundir import RunDir
from cai.stages import BY_NAME, STAGE_NAMES, STAGES, Stage
from cai.stages.common import Context
from cai.stages.training_loop import TrainingLoop, warmup_lr


def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_config_has_one_section_per_row_in_table_order():
    settings = [f.name for f in dataclasses.fields(RunSettings)]
    fields = dataclasses.fields(RunConfig)
    assert [f.name for f in fields] == settings + list(STAGE_NAMES)
    config = RunConfig()
    for stage in STAGES:
        assert type(getattr(config, stage.name)) is stage.config
    assert config.stages == list(STAGE_NAMES)
    assert list(config_to_dict(config))[-len(STAGES):] == list(STAGE_NAMES)
    assert config_from_dict({"sft": {"lr": 0.5}}).sft.lr == 0.5


def test_cli_commands_follow_the_table():
    commands = _subcommands()
    assert [c for c in commands if c not in ("run", "report", "eval")] == [s.replace("_", "-") for s in STAGE_NAMES]
    for stage in STAGES:
        options = {o for a in commands[stage.name.replace("_", "-")]._actions for o in a.option_strings}
        assert ("--engine" in options) == (stage.scale_out == "ray"), stage.name
        assert ("--input" in options) == isinstance(stage.input, str), stage.name


def test_table_rows_are_consistent():
    assert len(set(STAGE_NAMES)) == len(STAGES) and BY_NAME == {s.name: s for s in STAGES}
    for k, stage in enumerate(STAGES):
        sources = (stage.input,) if isinstance(stage.input, str) else stage.input
        # a stage reads the prompt set or stages that run before it
        assert all(s == "prompts" or STAGE_NAMES.index(s) < k for s in sources), stage.name
        assert callable(stage.function) and dataclasses.is_dataclass(stage.config)
        assert stage.report is None or callable(stage.report)
    with pytest.raises(ValueError, match="scale_out"):
        Stage("x", len, RunSettings, input="prompts", scale_out="slurm", report=None)
    with pytest.raises(ValueError, match="key"):
        Stage("x", len, RunSettings, input="prompts", scale_out="none", report=None, key=())


def test_report_is_the_sections_in_table_order(tmp_path, monkeypatch):
    def section(name):
        return lambda run, metrics: [f"## section {name}", f"metrics: {sorted(metrics)}", ""]
    table = (Stage("b_stage", len, RunSettings, "prompts", "none", section("b")),
             Stage("silent", len, RunSettings, "b_stage", "none", None),
             Stage("a_stage", len, RunSettings, ("b_stage",), "none", section("a")))
    monkeypatch.setattr(cai.report, "STAGES", table)
    run = RunDir(tmp_path / "run")
    run.metrics.log("b_stage", 0, loss=1.0)
    run.mark_done("b_stage", {"rows": 3, "seconds": 2.0, "resumed": False})
    text = cai.report.write_report(run, RunConfig(name="demo")).read_text()
    assert text.index("| b_stage | 3 | 2.0 | no |") < text.index("| silent | not run | | |") \
        < text.index("| a_stage | not run | | |")
    assert text.index("## section b") < text.index("## section a")
    assert text.count("## section") == 2 and "metrics: ['b_stage']" in text


def _loop(root, model, optimizer, **kw) -> TrainingLoop:
    ctx = Context(run=RunDir(root), constitution=load_constitution("default"), progress=False)
    return TrainingLoop(ctx, "toy", modules={"model": model}, optimizer=optimizer, **kw)


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.1},
                                   {"params": model[1].parameters(), "lr": 1.0}])
    return model, optimizer


def _train(loop, model, optimizer, stop=None):
    lrs = []
    for step in loop.steps():
        if step == stop:
            return lrs  # a kill before this step
        x = torch.linspace(-1, 1, 6).reshape(2, 3) * (step + 1)
        loss = model(x).square().mean()
        loss.backward()
        loop.finish_step(step, list(model.parameters()), {"loss": loss.item()})
        lrs.append([g["lr"] for g in optimizer.param_groups])
    loop.close()
    return lrs


def test_training_loop_warms_up_records_and_resumes(tmp_path):
    kw = dict(total=5, save_every=2, warmup_steps=3, max_grad_norm=0.5)
    model, optimizer = _toy()
    loop = _loop(tmp_path / "whole", model, optimizer, **kw)
    lrs = _train(loop, model, optimizer)
    assert lrs == [[warmup_lr(s, 0.1, 3), warmup_lr(s, 1.0, 3)] for s in range(5)]
    assert lrs[0] == pytest.approx([0.1 / 3, 1.0 / 3]) and lrs[-1] == [0.1, 1.0]
    assert [r["step"] for r in loop.rows] == list(range(5))
    assert all(set(r) == {"step", "loss", "grad_norm"} for r in loop.rows)
    logged = loop.ctx.run.metrics.read("toy")
    assert [m["loss"] for m in logged] == [r["loss"] for r in loop.rows]
    assert all(m["grad_norm"] == r["grad_norm"] for m, r in zip(logged, loop.rows))

    # killed before step 3 (the last checkpoint: after step 1), resumed with a fresh model and optimizer
    model2, optimizer2 = _toy()
    _train(_loop(tmp_path / "killed", model2, optimizer2, **kw), model2, optimizer2, stop=3)
    model3, optimizer3 = _toy(seed=1)
    resumed = _loop(tmp_path / "killed", model3, optimizer3, **kw)
    assert resumed.start == 2 and [r["step"] for r in resumed.rows] == [0, 1]
    # the configured learning rates, not the checkpoint's warmed-up ones, stay the base of the warmup
    assert _train(resumed, model3, optimizer3) == lrs[2:]
    assert [r["loss"] for r in resumed.rows] == pytest.approx([r["loss"] for r in loop.rows], rel=1e-6)
    for p, q in zip(model.parameters(), model3.parameters()):
        torch.testing.assert_close(p, q)
