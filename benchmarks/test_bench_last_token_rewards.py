"""last_token_rewards: the reward head at each sequence's last real token, against HF's
sequence-classification head (the score on every position, then the last real token picked).

Cases, inputs and peers: ``benchmarks/_preference_cases.py``.
"""

import pytest

from ._preference_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: the harness

MEMORY_CASES = memory_cases("last_token_rewards")


@pytest.mark.parametrize("case,variant", bench_params("last_token_rewards"))
def test_last_token_rewards(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
