"""last_token_rewards: a scalar reward head applied only at each sequence's last real token.

A preference model's reward is ``head(hidden[b, last real token])``. Stacks usually apply the head to
every position and then gather (HF's sequence classifiers), reading all of (B, T, H) forward and
writing a dense GEMM gradient backward. Here the custom op ``cai_kernels::last_token_rewards`` reads
one hidden row per sequence (plus the mask, from the end). Its backward still returns a dense (.., T, H)
gradient for the hidden states, because autograd requires a gradient of the input's shape and strided
layout (sparse gradients exist, but the backward of whatever produced the hidden states, a final
LayerNorm for instance, cannot consume one); it is written in one pass, zeros except the gathered rows,
and skipped entirely when the hidden states do not require grad (a frozen backbone).
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import LastTokenRewardsParams
from .._validation import accumulate_dtype, check_head, check_hidden_and_mask, check_real_token_values, host_data_checks
from ..reference.last_token_rewards import last_token_index
from ..reference.last_token_rewards import last_token_rewards as reference
from ._kernel_op import KernelOp, traced
from ._layout import no_tensor, pack_head

_forward = KernelOp("last_token_rewards", op="last_token_rewards", kernel="last_token_rewards_fwd",
                    args="Tensor hidden, Tensor mask, Tensor active, Tensor weight, Tensor bias",
                    params=LastTokenRewardsParams, returns="(Tensor, Tensor)")
_backward = KernelOp("last_token_rewards_backward", op="last_token_rewards", kernel="last_token_rewards_bwd",
                     args="Tensor grad_rewards, Tensor hidden, Tensor index, Tensor weight, bool need_hidden, "
                          "bool need_weight", params=None, returns="(Tensor, Tensor, Tensor)")


@_forward.register_fake
def _(hidden, mask, active, weight, bias, params):
    n_seq = hidden.size(0) * hidden.size(1)
    return (hidden.new_empty(n_seq, dtype=accumulate_dtype(hidden.dtype)),
            hidden.new_empty(n_seq, dtype=torch.int64))


@_backward.register_fake
def _(grad_rewards, hidden, index, weight, need_hidden, need_weight, params):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.numel() if need_weight else 0), weight.new_empty(1 if need_weight else 0))


def _setup_context(ctx, args, params, backend, output):
    hidden, mask, active, weight, bias = args
    _, index = output
    ctx.save_for_backward(hidden, index, weight)
    ctx.has_bias, ctx.backend = bias.numel() > 0, backend


def _backward_formula(ctx, grad_rewards, _grad_index):
    if grad_rewards is None:
        return None, None, None, None, None
    hidden, index, weight = ctx.saved_tensors
    need_hidden = ctx.needs_input_grad[0]
    need_weight = ctx.needs_input_grad[3] or (ctx.has_bias and ctx.needs_input_grad[4])
    if grad_rewards.dtype != weight.dtype or not grad_rewards.is_contiguous():
        grad_rewards = grad_rewards.to(weight.dtype).contiguous()
    grad_hidden, grad_weight, grad_bias = _backward(grad_rewards, hidden, index, weight, need_hidden, need_weight,
                                                    params=None, backend=ctx.backend)
    return (grad_hidden if need_hidden else None, None, None, grad_weight if need_weight else None,
            grad_bias if need_weight and ctx.has_bias else None)


_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def sequence_rewards(hidden: torch.Tensor, mask: torch.Tensor, active: torch.Tensor, head_weight: torch.Tensor,
                     head_bias: torch.Tensor | None, mask_name: str, backend: str) -> torch.Tensor:
    """(N,) rewards of the sequences of an (outer, inner, T, H) view (arguments checked). An active sequence
    without a real token is a ValueError where ``host_data_checks`` says so (the C++ kernels check as they
    read; the Triton path checks the last-token indices after its kernel), NaN on a GPU."""
    weight, bias = pack_head(head_weight, head_bias, accumulate_dtype(hidden.dtype))
    rewards, index = _forward(hidden, mask, active, weight, bias, params=LastTokenRewardsParams(mask_name),
                              backend=backend)
    if backend != "cpu" and host_data_checks(hidden.device):
        check_real_token_values(mask_name, index, active, hidden.size(1))
    return rewards


def check_real_tokens_reference(mask_name: str, mask: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """The reference path's check that every (active) sequence has a real token; skipped while tracing."""
    if traced() or mask.device.type == "meta":
        return
    index = last_token_index(mask).reshape(-1)
    check_real_token_values(mask_name, index, None if active is None else active.reshape(-1),
                            mask.size(1) if mask.dim() == 3 else 1)


def last_token_rewards(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The scalar reward head at each sequence's last real token: ``hidden[..., t_last, :] . w + b``.

    Args:
        hidden: (B, T, H) or (B, K, T, H), fp32 / bf16 / fp16 (fp64 accepted), any strides.
        mask: hidden.shape[:-1], bool or integer, nonzero = real token. "Last" is the highest position whose
            mask is nonzero: right padding, left padding and masks with holes all work. A sequence without a
            real token is a ValueError on CPU tensors (and in ``cai_kernels.debug()`` mode); on a GPU its
            reward is NaN (checked on the device, no synchronization).
        head_weight: (H,) or (1, H); head_bias: a 0-d / 1-element tensor or None.
        backend: "reference" | "cpu" | "triton" | None (auto).
    Returns:
        rewards hidden.shape[:-2], fp32 (fp64 for fp64 hidden), computed in fp32. Differentiable w.r.t.
        hidden (a dense gradient, nonzero only at the last tokens), head_weight and head_bias.
    """
    if isinstance(hidden, torch.Tensor) and hidden.dim() not in (3, 4):
        raise ValueError(f"hidden must have shape (B, T, H) or (B, K, T, H); got shape {tuple(hidden.shape)}")
    check_hidden_and_mask("hidden", hidden, "mask", mask, hidden.dim() if isinstance(hidden, torch.Tensor) else 3)
    check_head(head_weight, head_bias, hidden.size(-1), hidden.device)
    selected = _registry.select_backend("last_token_rewards", hidden.device, backend)
    if selected == "reference":
        check_real_tokens_reference("mask", mask)
        return reference(hidden, mask, head_weight, head_bias)
    hidden4d, mask3d = (hidden, mask) if hidden.dim() == 4 else (hidden.unsqueeze(1), mask.unsqueeze(1))
    rewards = sequence_rewards(hidden4d, mask3d, no_tensor(mask, torch.bool), head_weight, head_bias,
                               "mask", selected)
    # (B*K,) -> (B, K); (B,) stays as it is (a view of the same shape would only add an autograd node)
    return rewards if hidden.dim() == 3 else rewards.view(hidden.shape[:-2])
