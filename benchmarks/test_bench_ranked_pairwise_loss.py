"""ranked_pairwise_loss: InstructGPT's loss over all pairs of K ranked responses.

Cases, inputs and peers: ``benchmarks/_preference_cases.py``.
"""

import pytest

from ._preference_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: the harness

MEMORY_CASES = memory_cases("ranked_pairwise_loss")


@pytest.mark.parametrize("case,variant", bench_params("ranked_pairwise_loss"))
def test_ranked_pairwise_loss(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
