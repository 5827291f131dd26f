"""reward_pairwise_loss: the preference-model step from hidden states, against HF's score head + TRL's loss.

Cases, inputs and peers: ``benchmarks/_preference_cases.py``.
"""

import pytest

from ._preference_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: the harness

MEMORY_CASES = memory_cases("reward_pairwise_loss")


@pytest.mark.parametrize("case,variant", bench_params("reward_pairwise_loss"))
def test_reward_pairwise_loss(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
