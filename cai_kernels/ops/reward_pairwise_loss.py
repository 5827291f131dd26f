"""reward_pairwise_loss: the preference-model step from hidden states, last-token rewards then the pairwise loss.

A composition of two custom ops (``cai_kernels::last_token_rewards`` and ``cai_kernels::pairwise_loss``), so
autograd sums the gradients that reach the rewards from the loss and from any other use of the returned
rewards (a reward-centering term, for instance). No kernels of its own.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import Reduction
from .._validation import (accumulate_dtype, check_head, check_hidden_and_mask, check_per_row_arg,
                           check_probability_values)
from ._kernel_op import traced
from ..reference.reward_pairwise_loss import reward_pairwise_loss as reference
from .last_token_rewards import check_real_tokens_reference, sequence_rewards
from ._layout import no_tensor
from .pairwise_loss import pair_losses


def reward_pairwise_loss(chosen_hidden: torch.Tensor, chosen_mask: torch.Tensor, rejected_hidden: torch.Tensor,
                         rejected_mask: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None = None,
                         *, soft_labels: torch.Tensor | float | None = None,
                         margin: torch.Tensor | float | None = None, backend: str | None = None):
    """One preference-model step: rewards at each sequence's last real token, then the mean soft-label
    Bradley–Terry loss (``pairwise_loss``).

    Args:
        chosen_hidden, rejected_hidden: (B, T_c, H), (B, T_r, H) of one dtype, fp32 / bf16 / fp16 (fp64 accepted),
            any strides (the final hidden states of the chosen and rejected sequences; T may differ).
        chosen_mask, rejected_mask: (B, T_c), (B, T_r) bool or integer, nonzero = real token. Right padding, left
            padding and holes all work: the reward is read at the highest position whose mask is nonzero; a
            sequence without a real token is a ValueError.
        head_weight: (H,) or (1, H); head_bias: a 0-d / 1-element tensor or None.
        soft_labels, margin: as in ``pairwise_loss``, broadcastable to (B,).
        backend: "reference" | "cpu" | "triton" | None (auto).
    Returns:
        (loss 0-d, chosen_rewards (B,), rejected_rewards (B,)), fp32 (fp64 for fp64 hidden). Differentiable
        w.r.t. both hidden tensors (dense gradients, nonzero only at the last real tokens; none are computed
        when the hidden states do not require grad), head_weight and head_bias.
    """
    check_hidden_and_mask("chosen_hidden", chosen_hidden, "chosen_mask", chosen_mask, 3)
    check_hidden_and_mask("rejected_hidden", rejected_hidden, "rejected_mask", rejected_mask, 3)
    if rejected_hidden.dtype != chosen_hidden.dtype:
        raise TypeError(f"rejected_hidden must have the dtype of chosen_hidden ({chosen_hidden.dtype}); "
                        f"got {rejected_hidden.dtype}")
    batch, hidden_size, device = chosen_hidden.size(0), chosen_hidden.size(2), chosen_hidden.device
    if rejected_hidden.size(0) != batch or rejected_hidden.size(2) != hidden_size or rejected_hidden.device != device:
        raise ValueError(f"rejected_hidden must be (B={batch}, T, H={hidden_size}) on {device} like chosen_hidden; "
                         f"got shape {tuple(rejected_hidden.shape)} on {rejected_hidden.device}")
    if batch == 0:
        raise ValueError("chosen_hidden must hold at least one pair (the loss is a mean); got B = 0")
    check_head(head_weight, head_bias, hidden_size, device)
    shape = torch.Size((batch,))
    soft_labels = check_per_row_arg("soft_labels", soft_labels, shape, device, probability=True)
    margin = check_per_row_arg("margin", margin, shape, device, probability=False)
    selected = _registry.select_backend("reward_pairwise_loss", device, backend)
    if selected == "reference":
        check_real_tokens_reference("chosen_mask", chosen_mask)
        check_real_tokens_reference("rejected_mask", rejected_mask)
        if isinstance(soft_labels, torch.Tensor) and not traced() and device.type != "meta":
            check_probability_values("soft_labels", soft_labels.detach().expand(shape))
        return reference(chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, head_weight, head_bias,
                         soft_labels=soft_labels, margin=margin)
    all_active = no_tensor(chosen_mask, torch.bool)
    # the head cast to fp32 once: its gradients from both sides add in fp32 and round once to its dtype
    acc = accumulate_dtype(chosen_hidden.dtype)
    head_weight, head_bias = head_weight.to(acc), None if head_bias is None else head_bias.to(acc)
    chosen_rewards = sequence_rewards(chosen_hidden.unsqueeze(1), chosen_mask.unsqueeze(1), all_active, head_weight,
                                      head_bias, "chosen_mask", selected)
    rejected_rewards = sequence_rewards(rejected_hidden.unsqueeze(1), rejected_mask.unsqueeze(1), all_active,
                                        head_weight, head_bias, "rejected_mask", selected)
    loss = pair_losses(chosen_rewards, rejected_rewards, soft_labels, margin, shape, Reduction.MEAN, selected)
    return loss, chosen_rewards, rejected_rewards
