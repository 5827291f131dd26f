"""Views that let one kernel serve any (..., V) tensor without copying it.

Kernels address row r of a (outer, inner, V) tensor at
``(r // inner) * stride_outer + (r % inner) * stride_inner``, the last dim contiguous. Most views
users pass collapse to that form: contiguous tensors, ``logits[:, :-1]`` (a slice of the time axis),
``hidden.transpose(0, 1)``. Only views needing three or more leading strides are copied.

The collapse uses squeeze / flatten / unsqueeze (never as_strided) so that autograd maps the
gradient back with cheap view backwards.
"""

from __future__ import annotations

import torch


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., V) as an (outer, inner, V) view with ``stride(2) == 1``; a copy only when unavoidable."""
    if x.numel() == 0:
        return x.reshape(1, -1, x.size(-1))
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


def _mergeable_groups(x: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of leading dims where each dim steps exactly over the next one (flatten is then a view)."""
    groups: list[tuple[int, int]] = []
    for d in range(x.dim() - 1):
        if groups and x.stride(d - 1) == x.stride(d) * x.size(d):
            groups[-1] = (groups[-1][0], d)
        else:
            groups.append((d, d))
    return groups
