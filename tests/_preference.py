"""Inputs and tolerances shared by the preference-model tests."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REDUCTIONS = ("mean", "sum", "none")
# the acceptance bar for fp32: forward and backward within 1e-6 of the float64 reference
FP32_TOL = {"rtol": 1e-6, "atol": 1e-6}


def random_rewards(*shape, dtype=torch.float32, scale=3.0):
    """Normal rewards of std ``scale``, drawn in float64 and rounded once to ``dtype``."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
