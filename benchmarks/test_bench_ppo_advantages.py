"""ppo_advantages: the fused post-rollout step, against the reference (Python GAE loop inside) and the
composition of this library's single ops (kl_penalty, the shaping, gae, masked_whiten).

Cases, inputs and peers: ``benchmarks/_ppo_cases.py``.
"""

import pytest

from ._ppo_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: read by the harness

MEMORY_CASES = memory_cases("ppo_advantages")


@pytest.mark.parametrize("case,variant", bench_params("ppo_advantages"))
def test_ppo_advantages(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
