"""Argument checks shared by the public ops.

Errors name the argument and what was expected: a wrong type or dtype is a TypeError, a wrong
shape, value or device a ValueError. Checks that read tensor *data* (target ranges) live in
``check_targets_in_range`` and run only on real tensors, never while torch.compile traces.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """``value`` is a tensor of one of ``dtypes`` with the given rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}); got {_describe(value)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got {_describe(value)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got {_describe(value)}")
    return value


def check_float_tensor(name: str, value, **kwargs) -> torch.Tensor:
    return check_tensor(name, value, dtypes=FLOAT_DTYPES, **kwargs)


def check_shape(name: str, value: torch.Tensor, shape: Iterable[int], what: str) -> None:
    """``value.shape == shape``; ``what`` says where the expected shape comes from."""
    shape = tuple(shape)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}); got {_describe(value)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} ({first.device}); "
                             f"got {t.device}")


def check_positive_float(name: str, value) -> float:
    """A finite number > 0 (temperature, eps, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return float(value)


def check_optional_int(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None; got {type(value).__name__}")
    return value


def check_targets(name: str, targets, *, lead_shape: torch.Size, what: str) -> torch.Tensor:
    """int64 class indices with one entry per row of the scores."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 with shape {tuple(lead_shape)} ({what}); "
                        f"got {_describe(targets)}")
    check_shape(name, targets, lead_shape, what)
    return targets


def check_targets_in_range(name: str, targets: torch.Tensor, num_classes: int,
                           ignore_index: int | None) -> None:
    """Every target is in [0, num_classes) or equals ignore_index (reads the data: a sync on GPU)."""
    bad = (targets < 0) | (targets >= num_classes)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0, 0])
        value = int(targets.flatten()[first])
        raise ValueError(f"{name} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                         f"got {name}.flatten()[{first}] = {value}")
