"""Launch-size helpers shared by the Triton launchers."""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: ``triton.cdiv`` without its constexpr wrapper (~1 us a call on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): ``triton.next_power_of_2`` in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def pow2_block(n: int, cap: int) -> int:
    """Elements per step of a loop over n: the next power of two, at least 16, at most ``cap``."""
    return min(next_pow2(max(n, 16)), cap)


_SPLITS: dict[tuple[int, int], tuple[int, int]] = {}


def split_blocks(n: int, cap: int) -> tuple[int, int]:
    """(``pow2_block(n, cap)``, ``cdiv(n, block)``): a loop over n cut into blocks, remembered per (n, cap) (a
    dict lookup on the host instead of ~1 us of arithmetic; bounded: cleared past 4096 sizes)."""
    key = (n, cap)
    found = _SPLITS.get(key)
    if found is None:
        if len(_SPLITS) >= 4096:
            _SPLITS.clear()
        block = pow2_block(n, cap)
        found = _SPLITS[key] = block, cdiv(n, block)
    return found


def row_layout(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(rows, inner, stride_outer, stride_inner, V) of ``x`` as the row kernels address it: an (outer, inner, V)
    view with a unit stride along V, or a (rows, V) tensor with one, read as the (1, rows, V) view
    ``ops/_layout.py:rows_view`` would make of it (the same strides: the same compiled kernel, without a view on
    the host)."""
    if x.dim() == 2:
        rows, V = x.shape
        stride = x.stride(0)
        return rows, rows, rows * stride, stride, V
    outer, inner, V = x.shape
    stride = x.stride()
    return outer * inner, inner, stride[0], stride[1], V


def vector_warps(block: int, like: torch.Tensor) -> int:
    """Warps such that each thread holds 16 bytes of a block of ``like``'s dtype (one 128-bit load)."""
    per_thread = max(16 // like.element_size(), 1)
    return max(1, min(8, block // (32 * per_thread)))


def as_kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A response mask as the kernels read it: bool as uint8 (same bytes), other dtypes as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
