"""The dtype rules and the argument checks of every op: the one place both are written.

Dtype rules: every op computes and returns in fp32 (fp64 when an input is fp64), whatever the input
dtype; inputs of different float dtypes are promoted to a common one first (an exact upcast).

Checks: errors name the argument and what was expected: a wrong type or dtype is a TypeError, a wrong
shape, value or device a ValueError. They read attributes only (types, shapes, dtypes, devices): a few
microseconds a call, never a device synchronization.

Checks that read tensor *data* (targets in [0, V), soft labels in [0, 1], a real token in every sequence,
num_valid in [0, K], the multiple-choice layout) are the ``check_*_values`` / ``*_in_range`` /
``check_option_layout`` functions. Reading data from a GPU waits for it (a host-device synchronization,
and no CUDA graph can hold one), so where they run depends on the device (``host_data_checks``):
  * CPU tensors: always, on the host (no synchronization there); the C++ kernels check while they read,
    the Python layer checks for the reference and Triton backends. A ValueError names the argument.
  * GPU tensors: on the device. The kernels never read out of bounds on bad data: an out-of-range
    target, a soft label outside [0, 1], a sequence without a real token give NaN where that row's
    result would be (log-prob, loss, reward), so the error shows in the loss instead of as a crash.
    ``cai_kernels.debug()`` (or the environment variable ``CAI_KERNELS_DEBUG=1``) turns the host-side
    checks on for GPU tensors too: the ValueError of the CPU, at the price of a synchronization per check.
  * The reference backend (plain PyTorch, indexing with the data) checks on the host on every device.
  * While torch.compile traces, on meta / fake tensors, under a dispatch mode or a torch.func transform: no
    data to read (or none to branch on), no host-side check (the device-side masking still applies).
``choice_logprobs`` is the exception: its output's width K = max(num_options) is read from the data
(a synchronization by the API's design), and its layout checks ride along with that one read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch

from ._params import NO_BOUND

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1

# ---- debug mode: host-side data checks on every device ---------------------------------------------

_DEBUG = [os.environ.get("CAI_KERNELS_DEBUG", "0").strip().lower() not in ("", "0", "false", "no", "off")]


class debug:
    """``cai_kernels.debug(enabled=True)``: run the checks that read tensor data on the host for GPU tensors
    too (a ValueError naming the argument, as on the CPU; each check synchronizes with the device).

    Takes effect when called; as a context manager (``with cai_kernels.debug(): ...``) it restores the
    previous setting on exit. The environment variable ``CAI_KERNELS_DEBUG=1`` sets the initial value.
    Without it, GPU kernels mask bad data on the device and write NaN (see ``_validation``'s docstring)."""

    def __init__(self, enabled: bool = True):
        self.previous = _DEBUG[0]
        _DEBUG[0] = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _DEBUG[0] = self.previous


def debug_enabled() -> bool:
    """Whether ``cai_kernels.debug()`` (or CAI_KERNELS_DEBUG=1) is on."""
    return _DEBUG[0]


def host_data_checks(device: torch.device) -> bool:
    """Whether the checks that read tensor data run on the host for tensors on ``device``: on CPU tensors
    always, on GPUs in debug mode; never while tracing, under a dispatch mode or a torch.func transform (a
    vmapped tensor has no single value to branch on), or on meta tensors."""
    device_type = device.type
    if device_type != "cpu" and (device_type == "meta" or not _DEBUG[0]):
        return False
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active())

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Masks of real tokens (preference models): bool or integer. Response masks (PPO): also floating.
TOKEN_MASK_DTYPES = (torch.bool,) + INTEGER_DTYPES
RESPONSE_MASK_DTYPES = TOKEN_MASK_DTYPES + (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TOKEN_MASK_SET, _RESPONSE_MASK_SET = frozenset(TOKEN_MASK_DTYPES), frozenset(RESPONSE_MASK_DTYPES)


# ---- dtype rules ---------------------------------------------------------------------------------

def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes and returns in for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The float dtype several inputs are promoted to (bf16 + fp32 -> fp32, fp64 wins)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        other = t.dtype
        if other is not dtype:  # dtypes are singletons; promote_types is a dispatcher-free but ~0.3 us call
            dtype = torch.promote_types(dtype, other)
    return dtype


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """accumulate_dtype of several inputs: fp64 if any is fp64, else fp32."""
    return accumulate_dtype(common_dtype(*tensors))


# ---- tensors -------------------------------------------------------------------------------------

def describe(t: torch.Tensor) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """``value`` is a tensor of one of ``dtypes`` with the given rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}); got {describe(value)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got {describe(value)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got {describe(value)}")
    return value


_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)


def check_float_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """check_tensor with the float dtypes; the passing case in a few attribute reads (a call's host time)."""
    if isinstance(value, torch.Tensor) and value.dtype in _FLOAT_DTYPE_SET:
        dim = value.dim()
        if (ndim is None or dim == ndim) and (min_ndim is None or dim >= min_ndim):
            return value
    return check_tensor(name, value, dtypes=FLOAT_DTYPES, ndim=ndim, min_ndim=min_ndim)


def check_shape(name: str, value: torch.Tensor, shape: Iterable[int], what: str) -> None:
    """``value.shape == shape``; ``what`` says where the expected shape comes from."""
    if value.shape == shape:
        return
    shape = tuple(shape)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}); got {describe(value)}")


def check_same_device(names: tuple[str, ...], *tensors: torch.Tensor | None) -> None:
    """Every tensor (None skipped) on the device of the first; ``names`` name them in order."""
    device = tensors[0].device
    for i in range(1, len(tensors)):
        t = tensors[i]
        if t is not None and t.device != device:
            raise ValueError(f"{names[i]} must be on the same device as {names[0]} ({device}); got {t.device}")


def check_rows(name: str, value, *, shape: tuple[int, ...] | None = None, what: str = "") -> torch.Tensor:
    """A floating (B, T) tensor (the PPO ops' layout), of ``shape`` when given."""
    if isinstance(value, torch.Tensor) and value.dtype in _FLOAT_DTYPE_SET and value.dim() == 2 and (
            shape is None or value.shape == shape):
        return value  # the passing case in a few attribute reads
    check_float_tensor(name, value, ndim=2)
    if shape is not None:
        check_shape(name, value, shape, what)
    return value


def check_mask(name: str, value, shape: Iterable[int], *, what: str = "one entry per token",
               floating: bool = True) -> torch.Tensor:
    """A mask of exactly ``shape``, nonzero = a real / response token: bool, integer or (``floating``, the
    PPO ops' response masks) floating."""
    if isinstance(value, torch.Tensor) and value.dtype in (_RESPONSE_MASK_SET if floating else _TOKEN_MASK_SET) \
            and value.shape == shape:
        return value  # the passing case in a few attribute reads
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if floating and value.dtype not in RESPONSE_MASK_DTYPES:
        raise TypeError(f"{name} must be bool, integer or floating (nonzero = response token); "
                        f"got {describe(value)}")
    if not floating and value.dtype not in TOKEN_MASK_DTYPES:
        allowed = ", ".join(str(d) for d in TOKEN_MASK_DTYPES)
        raise TypeError(f"{name} must be bool or an integer dtype ({allowed}); got {describe(value)}")
    check_shape(name, value, shape, what)
    return value


# ---- numbers and options -------------------------------------------------------------------------

def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")


def _finite(value) -> bool:
    """math.isfinite, also for the SymFloats of torch.compile(dynamic=True) (a comparison, which guards)."""
    return -math.inf < value < math.inf


def check_positive_float(name: str, value) -> float:
    """A finite number > 0 (temperature, ...)."""
    _check_real(name, value)
    if not (_finite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value if isinstance(value, (float, torch.SymFloat)) else float(value)


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number in [low, high] (``low_open``: (low, high])."""
    if type(value) is float and -math.inf < value < math.inf and (
            low is None or (value > low if low_open else value >= low)) and (high is None or value <= high):
        return value  # the passing case for a plain float in a few comparisons
    _check_real(name, value)
    if not isinstance(value, (float, torch.SymFloat)):
        value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if not _finite(value) or too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be a finite number in {bracket}{lo}, {hi}]; got {value}")
    return value


def check_optional_int(name: str, value) -> int | None:
    """None, or an int that fits int64 (what the kernels and the custom-op schemas take)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int or None; got {type(value).__name__}")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]); got {value}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: dict):
    """``value`` is one of the names in ``choices`` (a dict name -> enum member); returns the member."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return choices[value]


def check_reduction(reduction, choices: dict):
    """pairwise_loss / ranked_pairwise_loss's ``reduction``: a str, one of ``choices``; returns the member."""
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str; got {type(reduction).__name__}")
    if reduction not in choices:
        raise ValueError(f"reduction must be one of {tuple(choices)}; got {reduction!r}")
    return choices[reduction]


# Two kinds of (lo, hi) pairs, with different rules: clamps of probabilities (choice_logprobs) are two
# numbers within [0, 1]; bounds of a log-ratio or an estimate (kl_penalty) may leave a side open.

def check_probability_clamp(name: str, value) -> tuple[float, float] | None:
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


def check_bounds(name: str, value) -> tuple[float, float]:
    """None, or (lo, hi) with lo <= hi, either possibly None or infinite (unbounded). Returns finite
    stand-ins: -NO_BOUND / NO_BOUND for a missing side."""
    if value is None:
        return -NO_BOUND, NO_BOUND
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be None or a (lo, hi) pair; got {value!r}")
    lo, hi = value
    for side, bound in (("lo", lo), ("hi", hi)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
            raise TypeError(f"{name} {side} must be a number or None; got {type(bound).__name__}")
        if bound is not None and bound != bound:  # NaN (also for SymFloats)
            raise ValueError(f"{name} {side} must not be NaN; got {value!r}")
    lo = -NO_BOUND if lo is None or lo == -math.inf else float(lo)
    hi = NO_BOUND if hi is None or hi == math.inf else float(hi)
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi; got {value!r}")
    return lo, hi


# ---- log-prob ops --------------------------------------------------------------------------------

def check_targets(name: str, targets, *, lead_shape: torch.Size, what: str) -> torch.Tensor:
    """int64 class indices with one entry per row of the scores."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 with shape {tuple(lead_shape)} ({what}); "
                        f"got {describe(targets)}")
    check_shape(name, targets, lead_shape, what)
    return targets


def check_linear_operands(hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H), bias (V,) or None: one float dtype, matching sizes."""
    check_float_tensor("hidden", hidden, min_ndim=1)
    if hidden.size(-1) == 0:
        raise ValueError(f"hidden must have a non-empty last (hidden-size) dimension; got shape {tuple(hidden.shape)}")
    check_float_tensor("weight", weight, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype ({hidden.dtype}); got {weight.dtype}")
    if weight.size(1) != hidden.size(-1) or weight.size(0) == 0:
        raise ValueError(f"weight must have shape (V, H) with V >= 1 and H = hidden.shape[-1] = {hidden.size(-1)}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype ({hidden.dtype}); got {bias.dtype}")
        check_shape("bias", bias, (weight.size(0),), "one entry per row of weight")


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


# ---- preference-model ops ------------------------------------------------------------------------

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
                             f"got {describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a float, a torch.Tensor or None; got {type(value).__name__}")
    if not _finite(value) or (probability and not 0.0 <= value <= 1.0):
        expected = "a number in [0, 1]" if probability else "a finite number"
        raise ValueError(f"{name} must be {expected}; got {value}")
    return float(value)


def _broadcasts_to(value_shape: torch.Size, shape: torch.Size) -> bool:
    """torch.broadcast_shapes(value_shape, shape) == shape, without its (slow, Python) general case."""
    if len(value_shape) > len(shape):
        return False
    return all(v in (1, s) for v, s in zip(reversed(value_shape), reversed(shape)))


def check_probability_values(name: str, labels: torch.Tensor) -> None:
    """Every entry of the flattened per-pair labels lies in [0, 1] (NaN does not); reads the data."""
    bad = ~((labels >= 0) & (labels <= 1))
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, 1]; got {labels.reshape(-1)[first].item()} for pair {first}")


def check_hidden_and_mask(hidden_name: str, hidden, mask_name: str, mask, ndim: int) -> torch.Tensor:
    """hidden: float, ``ndim`` dims (..., T, H) with T, H >= 1; mask: bool / integer of shape hidden.shape[:-1]."""
    check_float_tensor(hidden_name, hidden, ndim=ndim)
    if hidden.size(-2) == 0 or hidden.size(-1) == 0:
        raise ValueError(f"{hidden_name} must have at least one position and one hidden unit; "
                         f"got shape {tuple(hidden.shape)}")
    check_mask(mask_name, mask, hidden.shape[:-1], what=f"{hidden_name}.shape[:-1]", floating=False)
    if mask.device != hidden.device:
        raise ValueError(f"{mask_name} must be on the same device as {hidden_name} ({hidden.device}); "
                         f"got {mask.device}")
    return hidden


def check_head(head_weight, head_bias, hidden_size: int, device: torch.device) -> None:
    check_float_tensor("head_weight", head_weight)
    if tuple(head_weight.shape) not in ((hidden_size,), (1, hidden_size)):
        raise ValueError(f"head_weight must have shape ({hidden_size},) or (1, {hidden_size}) (the hidden size); "
                         f"got {describe(head_weight)}")
    if head_weight.device != device:
        raise ValueError(f"head_weight must be on the same device as the hidden states ({device}); "
                         f"got {head_weight.device}")
    if head_bias is None:
        return
    check_float_tensor("head_bias", head_bias)
    if head_bias.numel() != 1:
        raise ValueError(f"head_bias must be a 0-d or 1-element tensor or None; got {describe(head_bias)}")
    if head_bias.device != device:
        raise ValueError(f"head_bias must be on the same device as the hidden states ({device}); "
                         f"got {head_bias.device}")


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


def check_num_valid(num_valid, batch: int, device: torch.device) -> torch.Tensor | None:
    if num_valid is None:
        return None
    if not isinstance(num_valid, torch.Tensor):
        raise TypeError(f"num_valid must be a torch.Tensor or None; got {type(num_valid).__name__}")
    if num_valid.dtype not in INTEGER_DTYPES:
        raise TypeError(f"num_valid must have an integer dtype; got {describe(num_valid)}")
    if tuple(num_valid.shape) != (batch,):
        raise ValueError(f"num_valid must have shape ({batch},) (one count per row); got {describe(num_valid)}")
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


# ---- PPO ops -------------------------------------------------------------------------------------

def check_discount(gamma, lam) -> tuple[float, float]:
    """GAE's gamma and lam, each in [0, 1]."""
    return check_number("gamma", gamma, low=0.0, high=1.0), check_number("lam", lam, low=0.0, high=1.0)


def check_loss_inputs(names: tuple[str, str, str], tensors, response_mask) -> None:
    """The three (B, T) inputs of a PPO loss, of one shape, and its response mask, on one device."""
    check_rows(names[0], tensors[0])
    shape = tuple(tensors[0].shape)
    for name, t in zip(names[1:], tensors[1:]):
        if not (isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPE_SET and t.shape == shape):
            check_rows(name, t, shape=shape, what=f"like {names[0]}")  # the message only when it fails
    check_mask("response_mask", response_mask, shape)
    check_same_device((*names, "response_mask"), *tensors, response_mask)
