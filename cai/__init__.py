"""cai: the Constitutional AI loop (Bai et al., 2022) on top of cai_kernels.

Stages (one table, cai.stages.STAGES): critique_revise -> sft -> sample_pairs -> label -> train_pm -> ppo ->
evaluate; `cai run` runs them in order in a run folder, skipping finished stages and resuming a killed one.
See `cai --help`.
"""

__version__ = "0.1.0"
