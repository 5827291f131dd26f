"""masked_whiten: batch-global whitening over response tokens.

Cases, inputs and peers: ``benchmarks/_ppo_cases.py``.
"""

import pytest

from ._ppo_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: read by the harness

MEMORY_CASES = memory_cases("masked_whiten")


@pytest.mark.parametrize("case,variant", bench_params("masked_whiten"))
def test_masked_whiten(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
