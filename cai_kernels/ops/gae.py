"""gae: generalized advantage estimation as one fused reverse scan, the core of RLHF-PPO's post-rollout step.

Not differentiable (every stack computes it under no_grad): inputs are detached. The compiled backends run
as the custom op ``cai_kernels::gae`` (with a fake implementation) while torch.compile traces; eager calls
run the kernel directly (``_kernel_op.py``): one launch.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import GaeParams
from .._validation import accumulate_dtype, check_discount, check_mask, check_rows, check_same_device
from ..reference.gae import gae as reference
from ._kernel_op import KernelOp
from ._layout import as_rows, detached, kernel_mask, vmap_rows


def _vmap(in_dims, rewards, values, mask, *, params, backend):
    """Rows are independent: the vmapped dimension joins B."""
    (rewards, values, mask), size = vmap_rows(in_dims, rewards, values, mask)
    T = rewards.size(-1)
    advantages, returns = _forward(*as_rows(rewards.reshape(-1, T), values.reshape(-1, T)), mask.reshape(-1, T),
                                   params=params, backend=backend)
    return (advantages.view(size, -1, T), returns.view(size, -1, T)), (0, 0)


_forward = KernelOp("gae", op="gae", kernel="gae_fwd", args="Tensor rewards, Tensor values, Tensor mask",
                    params=GaeParams, returns="(Tensor, Tensor)", vmap=_vmap)


@_forward.register_fake
def _(rewards, values, mask, params):
    acc = accumulate_dtype(rewards.dtype)
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation as one fused reverse scan (no Python loop over T).

    On response tokens, from the last position to the first:
        delta_t = rewards_t + gamma * next_value - values_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    where next_value is the value at the next response token (0 after the last one). Masked
    positions are skipped: next_value and the running advantage carry through them (veRL's
    skip-and-carry, for multi-turn masks with holes). For right-padded responses whose padded
    rewards and values are 0 this equals the usual ``reversed(range(T))`` loop
    (``cai_kernels.reference.gae`` is that loop).

    Args:
        rewards, values: (B, T) fp32 / bf16 / fp16 / fp64 (may differ), any strides. Entries at
            masked positions are never read into a result (NaN there is harmless).
        response_mask: (B, T) bool / integer / float, nonzero = response token.
        gamma, lam: discount and GAE lambda, in [0, 1].
    Returns:
        (advantages, returns), (B, T) fp32 (fp64 for fp64 inputs): the advantage A_t and
        returns = A_t + values_t on response tokens; both exactly 0 on masked positions.
    Not differentiable (the inputs are detached).
    """
    check_rows("rewards", rewards)
    shape = tuple(rewards.shape)
    check_rows("values", values, shape=shape, what="like rewards")
    check_mask("response_mask", response_mask, shape)
    check_same_device(("rewards", "values", "response_mask"), rewards, values, response_mask)
    gamma, lam = check_discount(gamma, lam)
    chosen = _registry.select_backend("gae", rewards.device, backend)
    rewards, values = detached(rewards), detached(values)
    if chosen == "reference":
        return reference(rewards, values, response_mask, gamma=gamma, lam=lam)
    return _forward(*as_rows(rewards, values), kernel_mask(response_mask), params=GaeParams(gamma, lam), backend=chosen)
