"""Launch-grid checks of the Triton launchers: every program on grid axis 0, so batches of more than 65535
rows (or row blocks) launch. Running 65536+ programs through the interpreter takes minutes (milliseconds a
program), so the kernels are replaced by recorders; the cpu backend runs B = 65536 for real in the op tests."""

from __future__ import annotations

import pytest
import torch


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def assert_grids_are_one_dimensional(monkeypatch, module, kernels: list[str], launch, *, also=None,
                                     persistent=None) -> None:
    """Replaces ``kernels`` of ``module`` (and ``also`` = (module, kernels)) by recorders, calls ``launch(x, m)`` on
    (280000, 3) inputs and checks that it launched, each grid 1-D with more than 65535 programs. ``persistent``
    = (module, kernels): kernels whose programs loop over the work (a capped 1-D grid), launched once each."""
    pytest.importorskip("triton")
    recorders, capped = [], []
    for mod, names in [(module, kernels)] + ([also] if also else []) + ([persistent] if persistent else []):
        for name in names:
            recorder = RecordingKernel()
            monkeypatch.setattr(mod, name, recorder)
            (capped if persistent and mod is persistent[0] and name in persistent[1] else recorders).append(recorder)
    rows = 4 * 70_000  # row-block kernels (4 rows a program) still need 70000 programs
    x, m = torch.zeros(rows, 3), torch.ones(rows, 3, dtype=torch.bool)
    launch(x, m)
    grids = [grid for recorder in recorders for grid in recorder.grids]
    assert grids, f"{module.__name__}: nothing launched"
    for grid in grids:
        assert len(grid) == 1 and grid[0] > 65535, grid
    for recorder in capped:
        assert len(recorder.grids) == 1 and len(recorder.grids[0]) == 1 and 1 <= recorder.grids[0][0] <= 65535, \
            recorder.grids
