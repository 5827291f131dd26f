"""cai: the Constitutional AI loop (Bai et al., 2022) on top of cai_kernels.

Stages (one table, cai.stages.STAGES): critique_revise -> sft -> sample_pairs -> label -> train_pm -> ppo ->
evaluate; `cai run` runs them in order in a run folder, skipping finished stages and resuming a killed one.
See `cai --help`.
"""

__version__ = "0.1.0"


class CaiWarning(UserWarning):
    """Something a user should know that does not stop the run (a lock taken over from a killed run, damaged
    shards set aside by --repair, prompts cut to the model's context); the CLI prints it as `warning: ...`."""
