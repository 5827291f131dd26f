"""The PPO Triton launchers put every program on grid axis 0, so batches of more than 65535 rows (or
row blocks) launch: checked on the launches themselves. Running 65536+ programs through the
interpreter takes minutes (milliseconds a program), so the kernels are replaced by recorders here;
the cpu backend runs B = 65536 for real in the op tests."""

import pytest
import torch

pytest.importorskip("triton")

from cai_kernels.triton import ppo  # noqa: E402


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


KERNELS = ("kl_penalty_kernel", "gae_kernel", "ppo_advantages_kernel", "row_moments_kernel",
           "whiten_kernel", "loss_fwd_kernel", "loss_bwd_kernel")
LAUNCHERS = {
    "kl_penalty_fwd": lambda x, m: ppo.kl_penalty_fwd(x[None], x[None], 2, -1.0, 1.0, -1.0, 1.0),
    "kl_penalty_bwd": lambda x, m: ppo.kl_penalty_bwd(x, x[None], x[None], 2, -1.0, 1.0, -1.0, 1.0),
    "gae_fwd": lambda x, m: ppo.gae_fwd(x, x, m, 1.0, 0.95),
    "masked_whiten_fwd": lambda x, m: ppo.masked_whiten_fwd(x, m, True, True, 1e-8),
    "ppo_advantages_fwd": lambda x, m: ppo.ppo_advantages_fwd(x[:, 0].contiguous(), x, x, x, m, 0.1, 1.0, 0.95, 0,
                                                              -1.0, 1.0, -1.0, 1.0, True),
    "ppo_loss_fwd[policy]": lambda x, m: ppo.ppo_loss_fwd(x, x, x, m, 0, 0.8, 1.2, -1.0, 0),
    "ppo_loss_bwd[value]": lambda x, m: ppo.ppo_loss_bwd(torch.ones(()), x, x, x, m, x[:, 0].contiguous(), 1, 0.2,
                                                         0.0, 0.0),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_grids_are_one_dimensional_beyond_65535(monkeypatch, launcher):
    recorders = {name: RecordingKernel() for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(ppo, name, recorder)
    rows = 4 * 70_000  # row-block kernels (4 rows a program) still need 70000 programs
    x, m = torch.zeros(rows, 3), torch.ones(rows, 3, dtype=torch.bool)
    LAUNCHERS[launcher](x, m)
    grids = [grid for recorder in recorders.values() for grid in recorder.grids]
    assert grids, f"{launcher} launched nothing"
    for grid in grids:
        assert len(grid) == 1 and grid[0] > 65535, grid
