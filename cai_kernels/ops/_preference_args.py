"""Argument checks and per-row argument packing shared by the preference-model ops.

Errors follow ``cai_kernels._validation``: a wrong type or dtype is a TypeError, a wrong shape, value or
device a ValueError, and the message names the argument. Checks that read tensor data (labels in
[0, 1], a real token in every sequence, num_valid in [0, K]) are the ``check_*_values`` functions: the
public ops run them for the reference backend (never while torch.compile traces), the Triton custom ops
run them on the host, and the C++ kernels check while they read.
"""

from __future__ import annotations

import math

import torch

from .._validation import _describe, check_float_tensor

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_reduction(reduction) -> int:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str; got {type(reduction).__name__}")
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {tuple(REDUCTION_CODES)}; got {reduction!r}")
    return REDUCTION_CODES[reduction]


def check_per_row_arg(name: str, value, shape: torch.Size, device: torch.device, *, probability: bool):
    """``value`` is None, a finite number (in [0, 1] when ``probability``) or a float tensor broadcastable to
    ``shape`` on ``device``; returns it with a number as a float."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        check_float_tensor(name, value)
        if value.device != device:
            raise ValueError(f"{name} must be on the same device as the rewards ({device}); got {value.device}")
        if not _broadcasts_to(value.shape, shape):
            raise ValueError(f"{name} must be broadcastable to the rewards' shape {tuple(shape)}; "
                             f"got {_describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, a torch.Tensor or None; got {type(value).__name__}")
    if not math.isfinite(value) or (probability and not 0.0 <= value <= 1.0):
        expected = "a number in [0, 1]" if probability else "a finite number"
        raise ValueError(f"{name} must be {expected}; got {value}")
    return float(value)


def _broadcasts_to(value_shape: torch.Size, shape: torch.Size) -> bool:
    """torch.broadcast_shapes(value_shape, shape) == shape, without its (slow, Python) general case."""
    if len(value_shape) > len(shape):
        return False
    return all(v in (1, s) for v, s in zip(reversed(value_shape), reversed(shape)))


def pack_per_row(value, default: float, shape: torch.Size, acc: torch.dtype, device: torch.device):
    """(per-row tensor or empty, scalar) as the kernels take them: a tensor is detached (labels and margins
    are targets, no gradient), broadcast and flattened to one contiguous entry per pair in ``acc``."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.shape != shape:
            value = value.expand(shape)
        return value.to(acc).reshape(-1).contiguous(), default
    return torch.empty(0, dtype=acc, device=device), default if value is None else value


def check_probability_values(name: str, labels: torch.Tensor) -> None:
    """Every entry of the flattened per-pair labels lies in [0, 1] (NaN does not); reads the data."""
    bad = ~((labels >= 0) & (labels <= 1))
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, 1]; got {labels.reshape(-1)[first].item()} for pair {first}")


def check_mask(name: str, mask, shape: tuple, what: str) -> torch.Tensor:
    """A bool / integer mask (nonzero = real token) of exactly ``shape``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        allowed = ", ".join(str(d) for d in MASK_DTYPES)
        raise TypeError(f"{name} must be bool or an integer dtype ({allowed}); got {_describe(mask)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}); got {_describe(mask)}")
    return mask


def check_real_token_values(name: str, index: torch.Tensor, active: torch.Tensor | None, inner: int) -> None:
    """Every active sequence has a real token (its last-token index is >= 0); reads the data."""
    bad = index < 0
    if active is not None and active.numel():
        bad &= active
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        where = f"row {first // inner}" + (f", response {first % inner}" if inner > 1 else "")
        raise ValueError(f"{name}: every sequence needs at least one real token (mask != 0); sequence {first} "
                         f"({where}) has none")


def check_head(head_weight, head_bias, hidden_size: int, device: torch.device) -> None:
    check_float_tensor("head_weight", head_weight)
    if tuple(head_weight.shape) not in ((hidden_size,), (1, hidden_size)):
        raise ValueError(f"head_weight must have shape ({hidden_size},) or (1, {hidden_size}) (the hidden size); "
                         f"got {_describe(head_weight)}")
    if head_weight.device != device:
        raise ValueError(f"head_weight must be on the same device as the hidden states ({device}); "
                         f"got {head_weight.device}")
    if head_bias is None:
        return
    check_float_tensor("head_bias", head_bias)
    if head_bias.numel() != 1:
        raise ValueError(f"head_bias must be a 0-d or 1-element tensor or None; got {_describe(head_bias)}")
    if head_bias.device != device:
        raise ValueError(f"head_bias must be on the same device as the hidden states ({device}); "
                         f"got {head_bias.device}")


def pack_head(head_weight: torch.Tensor, head_bias: torch.Tensor | None, acc: torch.dtype):
    """(weight (H,), bias (1,) or empty), contiguous in ``acc``; differentiable (the casts' backward maps the
    fp32 gradients back to the parameters' dtypes)."""
    weight = head_weight.reshape(-1).to(acc).contiguous()
    bias = head_weight.new_empty(0, dtype=acc) if head_bias is None else head_bias.reshape(1).to(acc)
    return weight, bias


def check_num_valid(num_valid, batch: int, device: torch.device) -> torch.Tensor | None:
    if num_valid is None:
        return None
    if not isinstance(num_valid, torch.Tensor):
        raise TypeError(f"num_valid must be a torch.Tensor or None; got {type(num_valid).__name__}")
    if num_valid.dtype not in MASK_DTYPES[1:]:
        raise TypeError(f"num_valid must have an integer dtype; got {_describe(num_valid)}")
    if tuple(num_valid.shape) != (batch,):
        raise ValueError(f"num_valid must have shape ({batch},) (one count per row); got {_describe(num_valid)}")
    if num_valid.device != device:
        raise ValueError(f"num_valid must be on the same device as the rewards ({device}); got {num_valid.device}")
    return num_valid


def check_num_valid_values(num_valid: torch.Tensor, K: int) -> None:
    """Every count lies in [0, K]; reads the data."""
    bad = (num_valid < 0) | (num_valid > K)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"num_valid must lie in [0, {K}] (K = rewards.size(1)); "
                         f"got num_valid[{first}] = {int(num_valid[first])}")
