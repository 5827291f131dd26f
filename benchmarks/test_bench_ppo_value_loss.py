"""ppo_value_loss: PPO's clipped value loss, forward and backward into the values.

Cases, inputs and peers: ``benchmarks/_ppo_cases.py``.
"""

import pytest

from ._ppo_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: read by the harness

MEMORY_CASES = memory_cases("ppo_value_loss")


@pytest.mark.parametrize("case,variant", bench_params("ppo_value_loss"))
def test_ppo_value_loss(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
