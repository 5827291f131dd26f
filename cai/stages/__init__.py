"""The one table of CAI stages, in run order. `cai.config`, `cai.run`, `cai.cli` and `cai.report` read it.

Each row names a stage and where its pieces live:
  name          the stage's name: its config section, its folder in the run folder, its dataset, its CLI command
                (with "-" for "_"), its metrics
  function      function(input_rows, stage_config, ctx) -> rows: the stage's dataset
  config        the stage's config dataclass (the RunConfig section `name`)
  input         the dataset it reads: "prompts" (the run's prompt set) or an earlier stage's name, which
                `--input FILE` may replace; or a tuple of stage names: those of them that have finished, as
                {name: rows} (no --input)
  scale_out     "data_parallel": runs on every torchrun / accelerate rank, each a slice of every batch;
                "ray": a batch stage whose batches may run on a Ray actor pool (`--engine ray`);
                "none": one process (rank 0 under torchrun)
  report        report(run, metrics) -> markdown lines (plots written beside): the stage's report section,
                metrics = metrics.jsonl's records grouped by stage; None: no section of its own
  key           the fields that identify one row of the stage's dataset (default ("id",)): no two rows may share
                them (checked before the stage is marked done, so a damaged resume cannot double a row unnoticed;
                rows without those fields all share the key None, so a wrong key fails loudly)

Adding a stage: write its module here in cai/stages/ (config dataclass, stage function, report section) and add
one row below; the config section, the `cai <stage>` command, run order, resume and the report follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import critique_revise, evaluate, label, ppo, sample_pairs, sft, train_pm

SCALE_OUT = ("data_parallel", "ray", "none")


@dataclass(frozen=True)
class Stage:
    name: str
    function: Callable
    config: type
    input: str | tuple[str, ...]
    scale_out: str
    report: Callable | None
    key: tuple[str, ...] = ("id",)

    def __post_init__(self):
        if self.scale_out not in SCALE_OUT:
            raise ValueError(f"stage {self.name}: scale_out must be one of {SCALE_OUT}; got {self.scale_out!r}")
        if not self.key or not all(isinstance(k, str) for k in self.key):
            raise ValueError(f"stage {self.name}: key must be a tuple of row field names; got {self.key!r}")


STAGES: tuple[Stage, ...] = (
    Stage("critique_revise", critique_revise.critique_revise, critique_revise.CritiqueReviseConfig,
          input="prompts", scale_out="ray", report=critique_revise.report_section, key=("id",)),
    Stage("sft", sft.sft, sft.SFTConfig, input="critique_revise", scale_out="data_parallel",
          report=sft.report_section, key=("step",)),
    # sample_pairs' numbers open the label section
    Stage("sample_pairs", sample_pairs.sample_pairs, sample_pairs.SamplePairsConfig, input="prompts",
          scale_out="ray", report=None, key=("id",)),
    Stage("label", label.label, label.LabelConfig, input="sample_pairs", scale_out="ray",
          report=label.report_section, key=("id",)),
    Stage("train_pm", train_pm.train_pm, train_pm.TrainPMConfig, input="label", scale_out="data_parallel",
          report=train_pm.report_section, key=("pair_kind", "id")),
    Stage("ppo", ppo.ppo, ppo.PPOConfig, input="prompts", scale_out="data_parallel", report=ppo.report_section,
          key=("iteration", "id")),
    Stage("evaluate", evaluate.evaluate, evaluate.EvaluateConfig,
          input=("critique_revise", "sft", "train_pm", "ppo"), scale_out="none", report=evaluate.report_section,
          key=("section", "id")),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
