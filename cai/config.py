"""The run config: one dataclass per stage (defined next to the stage, listed in cai.stages), gathered in RunConfig.

Presets live in cai/presets/<name>.yaml (`tiny`, `paper`); a config is a preset name or a YAML file whose
keys override the dataclass defaults (unknown keys are errors). `--set stage.key=value` overrides one key
(the value is read as YAML: `--set label.principles_per_comparison=4`, `--set label.clamp=[0.3,0.7]`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import PromptsConfig
from .stages import STAGE_NAMES, STAGES

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class RunSettings:
    """The run-wide keys of a config; RunConfig adds one section per stage."""
    name: str = "custom"
    seed: int = 0
    model: str = "embedded"  # base model: policy init, feedback model, PM init (HF id, local folder, "embedded")
    constitution: str = "default"  # "default", a YAML file, or a folder of the paper's JSON files
    device: str = "auto"
    dtype: str = "auto"
    allow_download: bool = False  # let transformers / datasets fetch from the Hub
    trust_remote_code: bool = False
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    prompts: PromptsConfig = field(default_factory=PromptsConfig)


# RunSettings + one field per stage of the table, named after it, holding its config dataclass
RunConfig = dataclasses.make_dataclass(
    "RunConfig", [(stage.name, stage.config, field(default_factory=stage.config)) for stage in STAGES],
    bases=(RunSettings,))
RunConfig.__module__ = __name__  # make_dataclass (Python < 3.12) would leave "types": pickle needs this one
RunConfig.__doc__ = "A run's config: the run-wide keys (RunSettings), then one section per stage (cai.stages)."


class ConfigError(ValueError):
    pass


def _check_value(where: str, f: dataclasses.Field, value):
    annotation = str(f.type)
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{where}: may not be null (expected {annotation})")
        return value
    base = annotation.split("|")[0].strip()
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(base)
    if base.startswith("list"):
        expected = list
    if expected is not None and (not isinstance(value, expected) or (base in ("int", "float") and
                                                                     isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
    return float(value) if base == "float" else value


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, key)
        else:
            values[name] = _check_value(key, f, value)
    config = cls(**values)
    if cls is RunConfig:
        bad = [s for s in config.stages if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; the stages are {list(STAGE_NAMES)}")
    return config


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data, "")


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(spec: str, overrides: list[str] = ()) -> RunConfig:
    """A preset name or a YAML path, then `key.sub=value` overrides."""
    path = PRESETS_DIR / f"{spec}.yaml" if (PRESETS_DIR / f"{spec}.yaml").is_file() else Path(spec)
    if not path.is_file():
        raise ConfigError(f"{spec}: neither a preset ({', '.join(preset_names())}) nor a YAML file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. label.both_orders=false")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
