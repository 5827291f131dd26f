"""masked_whiten: whitening with batch-global statistics over response tokens (TRL / veRL).

Not differentiable (the input is detached). The compiled backends run as the custom op
``cai_kernels::masked_whiten`` (with a fake implementation) while torch.compile traces; eager calls run the
kernels directly (``_kernel_op.py``): two launches on a GPU (per-row moments; the merge and the whitening).
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import MaskedWhitenParams
from .._validation import accumulate_dtype, check_flag, check_mask, check_number, check_rows, check_same_device
from ..reference.masked_whiten import masked_whiten as reference
from ._kernel_op import KernelOp
from ._layout import detached, kernel_mask, unit_stride_rows

_forward = KernelOp("masked_whiten", op="masked_whiten", kernel="masked_whiten_fwd", args="Tensor x, Tensor mask",
                    params=MaskedWhitenParams, returns="Tensor")


@_forward.register_fake
def _(x, mask, params):
    return x.new_empty(x.shape, dtype=accumulate_dtype(x.dtype))


def masked_whiten(x: torch.Tensor, response_mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8, backend: str | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and variance over all response tokens of the batch.

    As TRL's and veRL's ``masked_whiten``: the statistics are batch-global (not per row), the
    variance is unbiased (n - 1) by default, and ``shift_mean=False`` adds the mean back.
    Differences, by design: masked positions are 0 in the output (not whitened padding); with no
    response token the output is all 0; with one, unbiased variance is taken as 0 (TRL raises).
    Statistics are accumulated in fp64 from per-row moments (no cancellation for large means).

    Args:
        x: (B, T) fp32 / bf16 / fp16 / fp64, any strides. response_mask: (B, T), nonzero = response.
    Returns:
        (B, T) fp32 (fp64 for fp64 x). Not differentiable (x is detached).
    """
    check_rows("x", x)
    check_mask("response_mask", response_mask, tuple(x.shape))
    check_same_device(("x", "response_mask"), x, response_mask)
    shift_mean, unbiased = check_flag("shift_mean", shift_mean), check_flag("unbiased", unbiased)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    chosen = _registry.select_backend("masked_whiten", x.device, backend)
    x = detached(x)
    if chosen == "reference":
        return reference(x, response_mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    return _forward(unit_stride_rows(x), kernel_mask(response_mask),
                    params=MaskedWhitenParams(shift_mean, unbiased, eps), backend=chosen)
