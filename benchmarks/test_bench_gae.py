"""gae: GAE as one reverse scan, against the reference and the Python loop over T of OpenRLHF / veRL
(torch.compile of that loop is reported as not practical: see _ppo_cases.py).

Cases, inputs and peers: ``benchmarks/_ppo_cases.py``.
"""

import pytest

from ._ppo_cases import bench_params, build_step, memory_cases, run  # noqa: F401 - build_step: read by the harness

MEMORY_CASES = memory_cases("gae")


@pytest.mark.parametrize("case,variant", bench_params("gae"))
def test_gae(benchmark, request, case, variant):
    run(benchmark, request, __name__, case, variant)
