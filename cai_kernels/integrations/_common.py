"""Small pieces the stack adapters share: dtype rules and the rescaling of our loss reductions.

Dtype contract: an adapter returns exactly the dtypes the stack's own function returns for the same
input dtypes (the stacks compute in the inputs' precision and PyTorch's type promotion decides; a
float32 mask, a ``.float()`` or a ``+ 1e-8`` on an integer count moves their results to fp32). Our
ops compute in fp32; each adapter casts to the stack's dtype, which it gets by replaying the
stack's own arithmetic on one-element probes (`probe`), cached per input dtypes.
"""

from __future__ import annotations

import torch


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's type promotion gives ``a op b`` of these tensors (what the stacks return)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def probe(dtype: torch.dtype, *, dims: int = 1) -> torch.Tensor:
    """A CPU tensor of ones of this dtype (``dims`` 0: a 0-d tensor), to replay a stack's type promotion."""
    return torch.ones((1,) * dims, dtype=dtype)


def dtype_key(value):
    """Hashable stand-in for ``value`` in a cached dtype rule: (dtype, is 0-d) for tensors, the type else."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.dim() == 0)
    return None if value is None else type(value)


def key_probe(key, *, dims: int = 1):
    """The probe for a `dtype_key` (a Python number's type gives 1 of that type)."""
    if key is None:
        return None
    if isinstance(key, tuple):
        return probe(key[0], dims=0 if key[1] else dims)
    return key(1)


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
