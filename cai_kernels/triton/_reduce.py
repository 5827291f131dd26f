"""The second launch of an op whose result is a global sum: partial sums (one per program of the first
launch) added in order by one program, so the result is the same on every run (no atomics).

Ops whose first launch fits one program write the result themselves and skip this launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FINISH_BLOCK = 1024


@triton.jit
def sum_partials_kernel(partials_ptr, out_ptr, n, divisor, BLOCK: tl.constexpr):
    """out[0] = sum(partials[:n]) / divisor, summed in partials' dtype (fp64) in a fixed order, stored in out's."""
    acc = tl.zeros((BLOCK,), partials_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, axis=0) / divisor).to(out_ptr.dtype.element_ty))


def sum_partials(partials: torch.Tensor, out: torch.Tensor, divisor: int) -> None:
    """out (0-d) = partials.sum() / divisor (an int: exact in fp64), one program."""
    sum_partials_kernel[(1,)](partials, out, partials.numel(), divisor, BLOCK=FINISH_BLOCK, num_warps=4)


def _aot_specs():
    from ._aot import AotSpec

    return [AotSpec("sum_partials_kernel", {"partials_ptr": "*fp64", "out_ptr": "*fp32"}, {"BLOCK": FINISH_BLOCK},
                    aligned=("partials_ptr", "out_ptr", "n"), label="fp64->fp32")]


AOT_SPECS = _aot_specs()
