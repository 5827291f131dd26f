"""Argument checks and layouts shared by the PPO ops (kl_penalty, gae, masked_whiten, ppo_advantages,
ppo_policy_loss, ppo_value_loss).

Every (B, T) tensor reaches the kernels with a unit stride along T (a copy only when it has none)
and any row stride. Float inputs of different dtypes are promoted to a common one first (an exact
upcast: bf16 + fp32 -> fp32, fp64 wins). Response masks pass through in bool / uint8 / int32 /
int64 / float32 (the kernels read them as they are); any other dtype becomes ``mask != 0``.
"""

from __future__ import annotations

import math
import sys

import torch

from .._validation import _describe, check_float_tensor, check_same_device

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)
# Stands for "no bound" in clamp arguments: finite, so that compiled graphs never hold an inf
# literal, and beyond every float (it rounds to inf in fp32).
NO_BOUND = sys.float_info.max


def check_rows(name: str, value, *, shape: tuple[int, ...] | None = None, what: str = "") -> torch.Tensor:
    """A floating (B, T) tensor, of ``shape`` when given."""
    check_float_tensor(name, value, ndim=2)
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}); got {_describe(value)}")
    return value


def check_mask(name: str, value, shape: tuple[int, ...]) -> torch.Tensor:
    """A (B, T) response mask (nonzero = response token) of a bool, integer or float dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be bool, integer or floating (nonzero = response token); "
                        f"got {_describe(value)}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one entry per token); got {_describe(value)}")
    return value


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: its own dtype when they support it, else ``mask != 0``."""
    if mask.dtype not in KERNEL_MASK_DTYPES:
        mask = mask != 0
    return unit_stride_rows(mask)


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T) with stride 1 along T: itself when it has it (any row stride), else a copy."""
    if x.size(1) > 1 and x.stride(1) != 1:
        return x.contiguous()
    return x


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The float tensors in one dtype, each with a unit stride along T."""
    dtype = common_dtype(*tensors)
    return [unit_stride_rows(t.to(dtype)) for t in tensors]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number in [low, high] (``low_open``: (low, high])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be a finite number in {bracket}{lo}, {hi}]; got {value}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_bounds(name: str, value) -> tuple[float, float]:
    """None, or (lo, hi) with lo <= hi, either possibly None (unbounded). Returns finite stand-ins."""
    if value is None:
        return -NO_BOUND, NO_BOUND
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be None or a (lo, hi) pair; got {value!r}")
    lo, hi = value
    for side, bound in (("lo", lo), ("hi", hi)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
            raise TypeError(f"{name} {side} must be a number or None; got {type(bound).__name__}")
        if bound is not None and math.isnan(bound):
            raise ValueError(f"{name} {side} must not be NaN; got {value!r}")
    lo = -NO_BOUND if lo is None or lo == -math.inf else float(lo)
    hi = NO_BOUND if hi is None or hi == math.inf else float(hi)
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi; got {value!r}")
    return lo, hi


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


__all__ = ["NO_BOUND", "accumulate_dtype", "as_rows", "check_bounds", "check_choice", "check_flag", "check_mask",
           "check_number", "check_rows", "check_same_device", "common_dtype", "kernel_mask", "unit_stride_rows"]
