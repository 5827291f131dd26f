"""Small pieces the stack adapters share: dtype rules and the rescaling of our loss reductions."""

from __future__ import annotations

import torch


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's type promotion gives ``a op b`` of these tensors (what the stacks return)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def mask_count(mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Number of nonzero mask entries (over all, or along ``dim``), as fp32."""
    nonzero = mask != 0
    return (nonzero.sum() if dim is None else nonzero.sum(dim)).float()


def global_agg_scale(mask: torch.Tensor, agg: str, denominator, dp_size: int = 1) -> torch.Tensor:
    """Factor turning our op's local reduction into a stack's global-batch one.

    Our ops divide a masked token sum by the *local* count, at least 1: tokens ("token-mean") or
    rows that have tokens (the seq-mean modes). veRL and OpenRLHF, given the global batch's count
    (``batch_num_tokens`` / ``global_batch_size`` = ``denominator``), divide by that instead and
    multiply by ``dp_size`` (undoing the data-parallel gradient average). Both reductions are linear
    in the token losses, so the difference is this scalar: local count / denominator * dp_size.
    """
    if agg == "token-mean":
        local = mask_count(mask).clamp(min=1)
    else:
        local = (mask_count(mask, -1) > 0).float().sum().clamp(min=1)
    return local / denominator * dp_size
