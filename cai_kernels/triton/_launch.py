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


def vector_warps(block: int, like: torch.Tensor) -> int:
    """Warps such that each thread holds 16 bytes of a block of ``like``'s dtype (one 128-bit load)."""
    per_thread = max(16 // like.element_size(), 1)
    return max(1, min(8, block // (32 * per_thread)))


def as_kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A response mask as the kernels read it: bool as uint8 (same bytes), other dtypes as they are."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
