"""kl_penalty: per-token KL estimates (fwd: k1, the post-rollout KL; fwd+bwd: k3, GRPO's KL loss term,
backward into the new log-probs).

Cases, inputs and peers: ``benchmarks/_ppo_cases.py``.
"""

import pytest

from ._ppo_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: read by the harness

MEMORY_CASES = memory_cases("kl_penalty")


@pytest.mark.parametrize("case,variant", bench_params("kl_penalty"))
def test_kl_penalty(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
