"""TRL's, veRL's and OpenRLHF's own test files pass with the cai_kernels adapters patched in.

Each suite runs twice in a subprocess (tests/peer_suites.py): unpatched, then with ``apply_to_<stack>()``
applied before its test modules import (and the module copies its tests load patched too). Every test
that passes unpatched must pass patched, except those listed in ``peer_suites.KNOWN_DIFFERENCES``
(and README) with the reason. The patched run must really have called our adapters. Run with ``-s``
to see the counts.
"""

from __future__ import annotations

import pytest

import peer_suites


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["openrlhf", "verl", "trl"])
def test_stack_suite_passes_with_the_adapters_patched_in(stack, tmp_path):
    suite = peer_suites.locate(stack, tmp_path)
    if isinstance(suite, str):
        pytest.skip(suite)
    plain = peer_suites.run(suite, patch=False, out_dir=tmp_path / "runs")
    patched = peer_suites.run(suite, patch=True, out_dir=tmp_path / "runs")
    before, after = peer_suites.counts(plain["outcomes"]), peer_suites.counts(patched["outcomes"])
    print(f"\n{stack} ({suite.version}), {len(suite.files)} files: unpatched {before}, patched {after}")
    print(f"{stack}: adapter calls in the patched run: {patched['calls']}")
    assert before["passed"] >= peer_suites.MIN_PASSED[stack], plain["log_tail"]

    regressions = sorted(node for node, outcome in plain["outcomes"].items()
                         if outcome == "passed" and patched["outcomes"].get(node) != "passed")
    known = {node: peer_suites.known_reason(stack, node) for node in regressions}
    for node, reason in known.items():
        if reason:
            print(f"{stack}: known difference {node}: {reason}")
    unexplained = [node for node, reason in known.items() if reason is None]
    assert not unexplained, f"pass unpatched, fail patched: {unexplained}\n{patched['log_tail']}"
    # the patched run ran our code, not only the stack's fallbacks
    assert any(name.endswith("(adapter)") and count > 0 for name, count in patched["calls"].items()), patched
