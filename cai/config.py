"""The run config: one dataclass per stage (defined next to the stage, listed in cai.stages), gathered in RunConfig.

Presets live in cai/presets/<name>.yaml (`tiny`, `paper`); a config is a preset name or a YAML file whose
keys override the dataclass defaults (unknown keys are errors). `--set stage.key=value` overrides one key
(the value is read as YAML: `--set label.principles_per_comparison=4`, `--set label.clamp=[0.3,0.7]`).

Every value is checked before any work starts, all at once (a ConfigError lists every problem, one line each):
  * its type, from the field's annotation: int, float (an int or a numeric string such as "1e-5" is taken),
    str, bool, list[T] (each element a T), and `| None` where null is allowed;
  * the rules in the field's metadata, a plain dict read by `check_field` below:
        ge, gt, le, lt   bounds (for a list: of each element)
        choices          the allowed values (for a list: of each element)
        len, min_len     a list's exact / least length
        unique           True: a list's elements are distinct
        check            a function value -> None, or a message saying what is wrong
    e.g. `batch_size: int = field(default=8, metadata={"ge": 1})`,
         `top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})`.
    An unknown metadata key is an error (tests/test_cai_config.py reads every field), so a typo cannot
    silently switch a check off. A new config field states its rules the same way; nothing else to register.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from .data import PromptsConfig
from .stages import STAGE_NAMES, STAGES

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
OVERFLOW = ("truncate-left", "error")


def _device(spec) -> str | None:
    import torch

    try:
        torch.device(spec) if spec != "auto" else None
    except (RuntimeError, ValueError):
        return "expected 'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1'"
    return None


@dataclass
class RunSettings:
    """The run-wide keys of a config; RunConfig adds one section per stage."""
    name: str = "custom"
    seed: int = field(default=0, metadata={"ge": 0})
    model: str = "embedded"  # base model: policy init, feedback model, PM init (HF id, local folder, "embedded")
    constitution: str = "default"  # "default", a YAML file, or a folder of the paper's JSON files
    device: str = field(default="auto", metadata={"check": _device})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    allow_download: bool = False  # let transformers / datasets fetch from the Hub (false: no network call at all)
    trust_remote_code: bool = False
    # prompts longer than the model's context (generation and scoring): cut from the left, with a warning that
    # counts them, or an error
    prompt_overflow: str = field(default="truncate-left", metadata={"choices": OVERFLOW})
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES),
                              metadata={"choices": STAGE_NAMES, "unique": True})
    prompts: PromptsConfig = field(default_factory=PromptsConfig)


# RunSettings + one field per stage of the table, named after it, holding its config dataclass
RunConfig = dataclasses.make_dataclass(
    "RunConfig", [(stage.name, stage.config, field(default_factory=stage.config)) for stage in STAGES],
    bases=(RunSettings,))
RunConfig.__module__ = __name__  # make_dataclass (Python < 3.12) would leave "types": pickle needs this one
RunConfig.__doc__ = "A run's config: the run-wide keys (RunSettings), then one section per stage (cai.stages)."


class ConfigError(ValueError):
    """Config values that fail their checks; `problems` holds one message per value."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


RULES = frozenset({"ge", "gt", "le", "lt", "choices", "len", "min_len", "unique", "check"})
_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _scalar(where: str, value, kind, rules: dict, problems: list[str]):
    """`value` as a `kind` (int, float, str, bool) after its bounds and choices; problems appended."""
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind in _SCALARS and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        problems.append(f"{where}: expected {_SCALARS[kind]}, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, float) and math.isnan(value):
            problems.append(f"{where}: must be a number, got nan")
            return value
        for rule, test, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                 ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if rule in rules and not test(value, rules[rule]):
                problems.append(f"{where}: must be {text} {rules[rule]}; got {value!r}")
    if "choices" in rules and value not in rules["choices"]:
        problems.append(f"{where}: must be one of {', '.join(map(repr, rules['choices']))}; got {value!r}")
    return value


def check_field(where: str, value, hint, rules: dict) -> tuple[object, list[str]]:
    """(the value, converted: an int where a float is expected becomes a float; the problems with it)."""
    unknown = set(rules) - RULES
    if unknown:
        raise TypeError(f"{where}: unknown check(s) {sorted(unknown)} in the field's metadata; known: {sorted(RULES)}")
    problems: list[str] = []
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None, ([] if len(options) < len(typing.get_args(hint)) else [f"{where}: may not be null"])
        hint = options[0]
    elif value is None:
        return None, [f"{where}: may not be null"]
    if typing.get_origin(hint) is list:
        kind = (typing.get_args(hint) or (object,))[0]
        if not isinstance(value, list):
            return value, [f"{where}: expected a list of {_SCALARS.get(kind, kind)} values, got {value!r}"]
        value = [_scalar(f"{where}[{i}]", v, kind, rules, problems) for i, v in enumerate(value)]
        if "len" in rules and len(value) != rules["len"]:
            problems.append(f"{where}: expected {rules['len']} values, got {len(value)}")
        if "min_len" in rules and len(value) < rules["min_len"]:
            problems.append(f"{where}: expected at least {rules['min_len']} value(s), got {len(value)}")
        if rules.get("unique") and len(set(map(repr, value))) != len(value):
            problems.append(f"{where}: values repeat ({value!r})")
    else:
        value = _scalar(where, value, hint, rules, problems)
    if "check" in rules and not problems:
        message = rules["check"](value)
        if message:
            problems.append(f"{where}: {message}; got {value!r}")
    return value, problems


def _build(cls, data, where: str, problems: list[str]):
    """An instance of the config dataclass `cls` from `data` (a mapping), every field checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'the config'}: expected a mapping of keys to values, got {data!r}")
        data = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(f"{where or 'the config'}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), data.get(name), key, problems)
            continue
        value, found = check_field(key, data.get(name, default), _hints(cls)[name], dict(f.metadata))
        problems += found
        values[name] = value
    return cls(**values)


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a mapping (a preset / YAML file / config.yaml); ConfigError lists every bad value."""
    problems: list[str] = []
    config = _build(RunConfig, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return config


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(spec: str, overrides: list[str] = ()) -> RunConfig:
    """A preset name or a YAML path, then `key.sub=value` overrides."""
    path = PRESETS_DIR / f"{spec}.yaml" if (PRESETS_DIR / f"{spec}.yaml").is_file() else Path(spec)
    if not path.is_file():
        raise ConfigError(f"{spec}: neither a preset ({', '.join(preset_names())}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. label.both_orders=false")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    try:
        return config_from_dict(data)
    except ConfigError as err:
        where = f"config {spec}" + (" with --set" if overrides else "")
        raise ConfigError([f"{where}: {problem}" for problem in err.problems]) from None
