"""Every config value is checked before any work (issue 13): ranges, list elements, the CLI's error lines."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from cai.cli import main as cai_main
from cai.config import RULES, ConfigError, RunConfig, _hints, check_field, config_from_dict, load_config


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", list(overrides))
    return err.value.problems


@pytest.mark.parametrize("override, message", [
    # the reproducers of issue 13
    ("critique_revise.batch_size=0", "critique_revise.batch_size: must be >= 1; got 0"),  # was ZeroDivisionError
    ("prompts.limit_per_source=-1", "prompts.limit_per_source: must be >= 0; got -1"),  # dropped a prompt per source
    ("critique_revise.rounds=-1", "critique_revise.rounds: must be >= 0; got -1"),  # was accepted
    ("label.clamp=[a,b]", "label.clamp[0]: expected a number, got 'a'"),  # list elements were unchecked
    # and their kin
    ("label.clamp=[0.7,0.3]", "label.clamp: expected [low, high] with low <= high; got [0.7, 0.3]"),
    ("label.clamp=[0.4]", "label.clamp: expected 2 values, got 1"),
    ("label.clamp=[0.4,1.5]", "label.clamp[1]: must be <= 1; got 1.5"),
    ("ppo.top_p=0", "ppo.top_p: must be > 0; got 0.0"),
    ("ppo.gamma=1.5", "ppo.gamma: must be <= 1; got 1.5"),
    ("ppo.kl_estimator=k4", "ppo.kl_estimator: must be one of 'k1', 'k2', 'k3', 'abs', 'low_var_kl'; got 'k4'"),
    ("sample_pairs.temperature=-0.5", "sample_pairs.temperature: must be >= 0; got -0.5"),
    ("train_pm.heldout_fraction=1", "train_pm.heldout_fraction: must be < 1; got 1.0"),
    ("sft.train_layers=0", "sft.train_layers: must be >= 1; got 0"),
    ("sft.lr=.nan", "sft.lr: must be a number, got nan"),
    ("evaluate.mc_limit=0", "evaluate.mc_limit: must be >= 1; got 0"),
    ("evaluate.mc_models=[base,base]", "evaluate.mc_models: values repeat"),
    ("prompts.sources=[]", "prompts.sources: expected at least 1 value(s), got 0"),
    ("device=gpu", "device: expected 'auto' or a torch device"),
    ("dtype=fp8", "dtype: must be one of 'auto', 'float32', 'bfloat16', 'float16'; got 'fp8'"),
    ("prompt_overflow=drop", "prompt_overflow: must be one of 'truncate-left', 'error'; got 'drop'"),
    ("sft.batch_size=2.5", "sft.batch_size: expected an integer, got 2.5"),
    ("sft.batch_size=true", "sft.batch_size: expected an integer, got True"),
    ("label.both_orders=3", "label.both_orders: expected true or false, got 3"),
    ("ppo.steps=null", "ppo.steps: may not be null"),
])
def test_bad_values_are_named(override, message):
    problems = problems_of(override)
    assert all(p.startswith("config tiny with --set: ") for p in problems)
    assert message in problems[0] and len(problems) == (2 if override == "label.clamp=[a,b]" else 1)


def test_every_problem_at_once():
    problems = problems_of("critique_revise.batch_size=0", "prompts.limit_per_source=-1", "label.clamp=[a,b]",
                           "sft.epochs=0", "label.princples=2")
    assert len(problems) == 6  # clamp's two elements are two problems
    assert any("label: unknown key(s) ['princples']" in p for p in problems)


def test_numbers_as_yaml_reads_them():
    config = load_config("tiny", ["sft.lr=1e-5", "ppo.kl_coef=0", "critique_revise.top_p=1"])
    assert config.sft.lr == 1e-5 and isinstance(config.ppo.kl_coef, float) and config.critique_revise.top_p == 1.0
    assert load_config("tiny", ["label.clamp=null"]).label.clamp is None  # null where the field allows it


def _fields(cls, where=""):
    for f in dataclasses.fields(cls):
        yield cls, f, f"{where}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{where}{f.name}.")


def test_every_field_uses_known_rules_and_its_default_passes():
    checked = 0
    for cls, f, where in _fields(RunConfig):
        assert set(f.metadata) <= RULES, f"{where}: unknown check(s) {set(f.metadata) - RULES}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if not dataclasses.is_dataclass(default):
            assert check_field(where, default, _hints(cls)[f.name], dict(f.metadata))[1] == [], where
            checked += bool(f.metadata)
    assert checked >= 60  # the rules are attached, not just allowed
    for preset in ("tiny", "paper"):
        load_config(preset)


def test_a_misspelled_rule_is_an_error():
    with pytest.raises(TypeError, match=r"x: unknown check\(s\) \['gte'\]"):
        check_field("x", 1, int, {"gte": 1})


def test_config_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="--set 'label.clamp=\\[0.4,': the value is not valid YAML"):
        load_config("tiny", ["label.clamp=[0.4,"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("tiny", ["sft..lr=1"])
    with pytest.raises(ConfigError, match="sft: expected a mapping"):
        config_from_dict({"sft": 3})


def test_cli_checks_the_config_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = cai_main(["run", "--out", str(out), "--set", "critique_revise.batch_size=0", "--set", "label.clamp=[a,b]",
                     "--set", "prompts.limit_per_source=-1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == [
        "error: config tiny with --set: prompts.limit_per_source: must be >= 0; got -1",
        "error: config tiny with --set: critique_revise.batch_size: must be >= 1; got 0",
        "error: config tiny with --set: label.clamp[0]: expected a number, got 'a'",
        "error: config tiny with --set: label.clamp[1]: expected a number, got 'b'"]
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("args, message", [
    (["run", "--out", ""], "argument --out: an empty path"),
    (["eval", "mc", "--data", "builtin:harmless_mc", "--batch-tokens", "0"], "argument --batch-tokens: must be >= 1"),
    (["label", "--out", "x", "--engine", "ray", "--actors", "0"], "argument --actors: must be >= 1"),
    (["label", "--out", "x", "--engine", "ray", "--cpus-per-actor", "0"], "argument --cpus-per-actor: must be > 0"),
    (["eval", "mc", "--data", "x", "--threads", "two"], "argument --threads: expected an integer, got 'two'"),
])
def test_cli_arguments_are_checked(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cai_main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cai_main(["run", "--out", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'file'}: the run folder (--out) is a file")
    assert cai_main(["report", "--out", str(tmp_path / "nothing")]) == 1
    assert "not a run folder (no config.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_saved_config_is_checked_on_resume(tmp_path, capsys):
    """A run folder whose config.yaml was damaged says so, naming the file."""
    from cai.run import open_run
    from cai.rundir import DamagedRunError

    out = tmp_path / "run"
    config = load_config("tiny")
    open_run(config, out, progress=False)
    (out / "config.yaml").write_text(yaml.safe_dump({"critique_revise": {"batch_size": 0}}))
    with pytest.raises(DamagedRunError, match="config.yaml: not a valid run config"):
        open_run(config, out, progress=False)
