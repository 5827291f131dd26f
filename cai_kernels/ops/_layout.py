"""How checked arguments reach the kernels: views, layouts and packing, copies only when unavoidable.

``rows_view``: one kernel serves any (..., V) tensor without copying it.

Kernels address row r of a (outer, inner, V) tensor at
``(r // inner) * stride_outer + (r % inner) * stride_inner``, the last dim contiguous. Most views
users pass collapse to that form: contiguous tensors, ``logits[:, :-1]`` (a slice of the time axis),
``hidden.transpose(0, 1)``. Only views needing three or more leading strides are copied.

The collapse uses squeeze / flatten / unsqueeze (never as_strided) so that autograd maps the
gradient back with cheap view backwards.
"""

from __future__ import annotations

import torch

from .._validation import common_dtype


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., V) as an (outer, inner, V) view with ``stride(2) == 1``; a copy only when unavoidable."""
    if x.numel() == 0:
        return x.reshape(1, -1, x.size(-1))
    if x.is_contiguous():  # the common case, and what the general path below gives for it
        return x.view(1, -1, x.size(-1))
    if x.size(-1) > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    unit_dims = tuple(d for d in range(x.dim() - 1) if x.size(d) == 1)
    if unit_dims:
        x = x.squeeze(unit_dims)  # a size-1 dim's stride is meaningless; drop it
    groups = _mergeable_groups(x)
    if len(groups) > 2:
        x = x.contiguous()
        groups = _mergeable_groups(x)
    for first, last in reversed(groups):
        x = x.flatten(first, last)
    while x.dim() < 3:
        x = x.unsqueeze(0)
    return x


def kernel_rows(x: torch.Tensor, backend: str) -> torch.Tensor:
    """``rows_view(x)``, or ``x`` itself where the Triton launchers take it as it is: a non-empty (rows, V) tensor
    with a unit stride along V (``triton/_launch.py:row_layout`` reads it as (1, rows, V)). No view on the host,
    and none in the autograd graph (a view node costs ~5 us forward + backward); the C++ kernels take 3-D views."""
    if backend == "triton" and x.dim() == 2 and (x.stride(1) == 1 or x.size(1) <= 1) and x.numel():
        return x
    return rows_view(x)


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D tensor (itself when it already is one: no dispatcher call)."""
    if x.dim() == 1 and x.is_contiguous():
        return x
    return x.reshape(-1).contiguous()


def vmap_rows(in_dims, *tensors: torch.Tensor | None) -> tuple[list, int]:
    """For a ``vmap`` rule of a row-wise op: each tensor with its vmapped dimension moved to the front (a
    tensor not vmapped, in_dim None, expanded along it) and the batch size; None stays None."""
    size = next(t.size(d) for t, d in zip(tensors, in_dims) if d is not None)
    moved = []
    for t, d in zip(tensors, in_dims):
        if t is None:
            moved.append(None)
        elif d is None:
            moved.append(t.expand(size, *t.shape))
        else:
            moved.append(t.movedim(d, 0))
    return moved, size


def _mergeable_groups(x: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of leading dims where each dim steps exactly over the next one (flatten is then a view)."""
    groups: list[tuple[int, int]] = []
    for d in range(x.dim() - 1):
        if groups and x.stride(d - 1) == x.stride(d) * x.size(d):
            groups[-1] = (groups[-1][0], d)
        else:
            groups.append((d, d))
    return groups


# ---- (B, T) rows of the PPO ops ------------------------------------------------------------------
# Every (B, T) tensor reaches the kernels with a unit stride along T (a copy only when it has none)
# and any row stride; float inputs of different dtypes are promoted to a common one first. Response
# masks pass through in the dtypes the kernels read as they are; any other dtype becomes ``mask != 0``.

KERNEL_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T) with stride 1 along T: itself when it has it (any row stride), else a copy."""
    if x.stride(1) != 1 and x.size(1) > 1:  # the stride first: one call when it is 1
        return x.contiguous()
    return x


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: its own dtype when they support it, else ``mask != 0``."""
    if mask.dtype not in KERNEL_MASK_DTYPES:
        mask = mask != 0
    return unit_stride_rows(mask)


def as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The float tensors in one dtype, each with a unit stride along T."""
    dtype = common_dtype(*tensors)
    # `.to` is skipped when it would be a no-op: each call is a dispatcher round trip (~5 us)
    return [unit_stride_rows(t if t.dtype == dtype else t.to(dtype)) for t in tensors]


_NO_TENSOR: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def no_tensor(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (0,) tensor of ``dtype`` on ``like``'s device: the kernels' "no such tensor" argument (no bias,
    no per-pair labels). One per (device, dtype), as it holds no data and nothing writes it (an allocation's
    ~1.5 us a call saved); a fresh one while tracing, under a dispatch mode or a torch.func transform (those
    tensors belong to the trace / transform) and in inference mode (an inference tensor cannot be saved for a
    later backward)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch.is_inference_mode_enabled()):
        return like.new_empty(0, dtype=dtype)
    key = (like.device, dtype)
    found = _NO_TENSOR.get(key)
    if found is None:
        found = _NO_TENSOR[key] = like.new_empty(0, dtype=dtype)
    return found


def detached(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from the autograd graph (without the detach() call when it is not in one)."""
    return x.detach() if x.requires_grad else x


# ---- per-pair and head arguments of the preference-model ops -------------------------------------

def pack_per_row(value, default: float, shape: torch.Size, acc: torch.dtype, empty: torch.Tensor):
    """(per-row tensor or ``empty``, scalar) as the kernels take them: a tensor is detached (labels and margins
    are targets, no gradient), broadcast and flattened to one contiguous entry per pair in ``acc``."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.shape != shape:
            value = value.expand(shape)
        return value.to(acc).reshape(-1).contiguous(), default
    return empty, default if value is None else value


def pack_head(head_weight: torch.Tensor, head_bias: torch.Tensor | None, acc: torch.dtype):
    """(weight (H,), bias (1,) or empty), contiguous in ``acc``; differentiable (the casts' backward maps the
    fp32 gradients back to the parameters' dtypes)."""
    # each step only where it changes something: a reshape of a (H,) weight is a view (~1.5 us, and a view
    # node in the autograd graph), `.to` / `.contiguous` no-ops still cost a call
    weight = head_weight if head_weight.dim() == 1 else head_weight.reshape(-1)
    if weight.dtype != acc:
        weight = weight.to(acc)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if head_bias is None:
        return weight, no_tensor(head_weight, acc)
    bias = head_bias if head_bias.dim() == 1 else head_bias.reshape(1)
    return weight, bias if bias.dtype == acc else bias.to(acc)
