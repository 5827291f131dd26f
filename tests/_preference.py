"""Inputs and tolerances shared by the preference-model tests."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REDUCTIONS = ("mean", "sum", "none")
# the acceptance bar for fp32: forward and backward within 1e-6 of the float64 reference
FP32_TOL = {"rtol": 1e-6, "atol": 1e-6}


def random_rewards(*shape, dtype=torch.float32, scale=3.0):
    """Normal rewards of std ``scale``, drawn in float64 and rounded once to ``dtype``."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def random_hidden(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)


def padded_mask(batch, length, style, dtype=torch.int64):
    """Masks with 1 = real token: right padding, left padding, holes, or no padding at all."""
    lengths = torch.randint(1, length + 1, (batch,))
    positions = torch.arange(length)
    if style == "right":
        mask = positions[None, :] < lengths[:, None]
    elif style == "left":
        mask = positions[None, :] >= (length - lengths)[:, None]
    elif style == "holes":
        mask = torch.rand(batch, length) < 0.6
        mask[:, 0] = True                    # at least one real token per row
        if length > 1:
            mask[0, -1] = False              # the last position padded, with real tokens before it
    else:
        mask = torch.ones(batch, length, dtype=torch.bool)
    return mask.to(dtype).to(DEVICE)


def random_head(hidden_size, *, bias=True, weight_shape=None, dtype=torch.float32):
    weight = (torch.randn(hidden_size, dtype=torch.float64) / hidden_size ** 0.5).to(dtype).to(DEVICE)
    if weight_shape is not None:
        weight = weight.reshape(weight_shape)
    return weight, (torch.randn((), dtype=torch.float64).to(dtype).to(DEVICE) if bias else None)


def leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


def double_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]
