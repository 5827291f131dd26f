"""Random (B, T) inputs for the PPO tests: log-probs, values and response masks of every shape that
occurs in practice (right / left padding, multi-turn holes, empty rows)."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MASK_KINDS = ("right", "left", "holes", "empty_rows", "full")


def logprobs(B: int, T: int, *, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    """Negative log-probs, like a policy's (as rounded to ``dtype``)."""
    return (-torch.rand(B, T, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def normal(B: int, T: int, *, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(B, T, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def response_mask(B: int, T: int, kind: str = "holes", *, dtype=torch.bool) -> torch.Tensor:
    """right: prompt-free right-padded responses; left: left-padded; holes: multi-turn responses with
    observation tokens in between; empty_rows: like holes with rows 0 and B // 2 fully masked; full."""
    steps = torch.arange(T)
    lengths = torch.randint(1, T + 1, (B,))
    if kind == "right":
        mask = steps[None, :] < lengths[:, None]
    elif kind == "left":
        mask = steps[None, :] >= (T - lengths)[:, None]
    elif kind == "full":
        mask = torch.ones(B, T, dtype=torch.bool)
    else:
        mask = (torch.rand(B, T) < 0.7) & (steps[None, :] < lengths[:, None])
        if kind == "empty_rows":
            mask[0] = False
            mask[B // 2] = False
    return mask.to(dtype).to(DEVICE)
