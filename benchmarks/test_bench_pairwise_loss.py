"""pairwise_loss: the soft-label Bradley–Terry loss on reward tensors, against TRL's / OpenRLHF's
-logsigmoid(chosen - rejected - margin).mean().

Cases, inputs and peers: ``benchmarks/_preference_cases.py``.
"""

import pytest

from ._preference_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: the harness

MEMORY_CASES = memory_cases("pairwise_loss")


@pytest.mark.parametrize("case,variant", bench_params("pairwise_loss"))
def test_pairwise_loss(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
