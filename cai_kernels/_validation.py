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


def check_option_layout(option_ids: torch.Tensor, num_options: torch.Tensor) -> None:
    """Multiple-choice layout (reads the data: a sync on GPU): every question has >= 1 option, every
    option id lies in [0, O) with O = num_options.sum(), and every option has at least one token."""
    small = num_options < 1
    if bool(small.any()):
        q = int(small.nonzero()[0, 0])
        raise ValueError(f"num_options must be >= 1 for every question; got num_options[{q}] = {int(num_options[q])}")
    num_opts = int(num_options.sum())
    bad = (option_ids < 0) | (option_ids >= num_opts)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"option_ids must lie in [0, {num_opts}) (O = num_options.sum()); "
                         f"got option_ids[{i}] = {int(option_ids[i])}")
    empty = torch.bincount(option_ids, minlength=num_opts) == 0
    if bool(empty.any()):
        o = int(empty.nonzero()[0, 0])
        raise ValueError(f"every option must have at least one token; option {o} has none "
                         f"(option_ids must cover [0, O), O = num_options.sum() = {num_opts})")


def check_clamp(name: str, value) -> tuple[float, float] | None:
    """None, or a pair (lo, hi) of numbers with 0 <= lo <= hi <= 1 (bounds for probabilities)."""
    if value is None:
        return None
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise TypeError(f"{name} must be None or a pair (lo, hi) of numbers; got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1; got ({lo}, {hi})")
    return lo, hi
