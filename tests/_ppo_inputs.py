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


def check_loss(op, reference_op, x, y, z, mask, backend, **kwargs):
    """A PPO loss ``op(x, y, z, mask) -> (loss, stats)`` against ``reference_op`` in float64: the 0-d loss, and
    its gradient w.r.t. x (x's dtype, 0 on masked positions). Returns (loss, stats, reference stats, gradient)."""
    from tests._backends import assert_close, grad_tolerance

    leaf = x.detach().requires_grad_()
    loss, stats = op(leaf, y, z, mask, backend=backend, **kwargs)
    assert loss.shape == () and loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    ref_leaf = x.detach().double().requires_grad_()
    ref_loss, ref_stats = reference_op(ref_leaf, y.double(), z.double(), mask, **kwargs)
    assert_close(loss, ref_loss, msg="loss")
    loss.backward()
    ref_loss.backward()
    assert leaf.grad.dtype == x.dtype
    assert_close(leaf.grad, ref_leaf.grad, **grad_tolerance(x.dtype), msg="gradient")
    assert torch.all(leaf.grad[mask == 0] == 0)
    return loss, stats, ref_stats, leaf.grad
