"""reward_ranked_loss: the ranked preference-model step, last-token rewards of K responses then the ranked loss.

A composition of two custom ops (``cai_kernels::last_token_rewards`` and ``cai_kernels::ranked_pairwise_loss``);
no kernels of its own.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._validation import check_head, check_hidden_and_mask, check_num_valid, check_num_valid_values, host_data_checks
from ..reference.reward_ranked_loss import reward_ranked_loss as reference
from .last_token_rewards import check_real_tokens_reference, sequence_rewards
from ._layout import no_tensor
from .ranked_pairwise_loss import ranked_loss


def reward_ranked_loss(hidden: torch.Tensor, mask: torch.Tensor, head_weight: torch.Tensor,
                       head_bias: torch.Tensor | None = None, *, num_valid: torch.Tensor | None = None,
                       backend: str | None = None):
    """Ranked preference-model step: rewards (B, K) at each response's last real token, then the mean
    ``ranked_pairwise_loss``.

    Args:
        hidden: (B, K, T, H) fp32 / bf16 / fp16 (fp64 accepted), any strides: K responses per prompt, ranked best
            first.
        mask: (B, K, T) bool or integer, nonzero = real token (right / left padding, holes). Every valid response
            needs a real token (else ValueError); responses k >= num_valid[b] are not read and may be all padding.
        head_weight: (H,) or (1, H); head_bias: a 0-d / 1-element tensor or None.
        num_valid: (B,) integers in [0, K], or None for K.
        backend: "reference" | "cpu" | "triton" | None (auto).
    Returns:
        (loss 0-d, rewards (B, K) with 0 at padding responses), fp32 (fp64 for fp64 hidden). Differentiable
        w.r.t. hidden, head_weight and head_bias.
    """
    check_hidden_and_mask("hidden", hidden, "mask", mask, 4)
    batch, K, device = hidden.size(0), hidden.size(1), hidden.device
    check_head(head_weight, head_bias, hidden.size(3), device)
    num_valid = check_num_valid(num_valid, batch, device)
    selected = _registry.select_backend("reward_ranked_loss", device, backend)
    if num_valid is not None and host_data_checks(device):
        check_num_valid_values(num_valid, K)  # before the masks: a bad count would blame the wrong argument
    active = None if num_valid is None else torch.arange(K, device=device) < num_valid[:, None]
    if selected == "reference":
        check_real_tokens_reference("mask", mask, active)
        return reference(hidden, mask, head_weight, head_bias, num_valid=num_valid)
    active = no_tensor(mask, torch.bool) if active is None else active.reshape(-1)
    rewards = sequence_rewards(hidden, mask, active, head_weight, head_bias, "mask", selected).view(batch, K)
    loss = ranked_loss(rewards, num_valid, "mean", selected)
    return loss, rewards
