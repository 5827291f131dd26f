"""ppo_advantages: the post-rollout step of RLHF-PPO fused: KL, reward shaping, GAE, whitening.

Not differentiable (inputs are detached). The compiled backends run as the custom op
``cai_kernels::ppo_advantages`` (with a fake implementation) while torch.compile traces; eager calls run the
kernels directly (``_kernel_op.py``): two launches on a GPU (KL, shaping, GAE and the rows' moments; the
merge of the moments and the whitening), one without whitening.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._params import ESTIMATORS, LOW_VAR_KL_CLAMP, LOW_VAR_KL_OUTPUT_CLAMP, NO_BOUND, PpoAdvantagesParams
from .._validation import (accumulate_dtype, check_choice, check_discount, check_flag,
                           check_float_tensor, check_mask, check_number, check_rows, check_same_device, describe)
from ..reference.ppo_advantages import ppo_advantages as reference
from ._kernel_op import KernelOp
from ._layout import as_rows, detached, kernel_mask

_forward = KernelOp("ppo_advantages", op="ppo_advantages", kernel="ppo_advantages_fwd",
                    args="Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor values, Tensor mask",
                    params=PpoAdvantagesParams, returns="(Tensor, Tensor, Tensor, Tensor)")


@_forward.register_fake
def _(scores, logprobs, ref_logprobs, values, mask, params):
    return tuple(logprobs.new_empty(logprobs.shape, dtype=accumulate_dtype(logprobs.dtype)) for _ in range(4))


def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                   response_mask: torch.Tensor, *, kl_coef: float, gamma: float = 1.0, lam: float = 0.95,
                   estimator: str = "k1", whiten: bool = True, backend: str | None = None):
    """The whole post-rollout step of RLHF-PPO, fused: KL, reward shaping, GAE, whitening.

    Per response token: kl = kl_penalty(logprobs, ref_logprobs, estimator); token_rewards =
    -kl_coef * kl, plus scores[b] at row b's last response token (TRL / OpenRLHF reward shaping);
    (advantages, returns) = gae(token_rewards, values, response_mask, gamma, lam); advantages =
    masked_whiten(advantages, response_mask) when ``whiten`` (returns keep the raw advantages, as
    in TRL and veRL). One read of the four (B, T) inputs for everything up to the advantages, and
    one more pass over the advantages to whiten them. Equal to composing ``kl_penalty`` (masked),
    ``reference.shape_rewards``, ``gae`` and ``masked_whiten`` (tested to 1e-5).

    Args:
        scores: (B,) sequence scores (the reward model's output), any float dtype.
        logprobs, ref_logprobs, values: (B, T) fp32 / bf16 / fp16 / fp64, any strides.
        response_mask: (B, T) nonzero = response token; rows may have holes or be empty.
        kl_coef: >= 0. estimator: "k1" | "k2" | "k3" | "abs" | "low_var_kl" (see kl_penalty).
    Returns:
        (advantages, returns, token_rewards, kl), each (B, T) fp32 (fp64 for fp64 inputs), all 0
        on masked positions (a row without response tokens is all 0). Not differentiable.
    """
    check_rows("logprobs", logprobs)
    shape = tuple(logprobs.shape)
    check_rows("ref_logprobs", ref_logprobs, shape=shape, what="like logprobs")
    check_rows("values", values, shape=shape, what="like logprobs")
    check_mask("response_mask", response_mask, shape)
    check_float_tensor("scores", scores)
    if tuple(scores.shape) != shape[:1]:
        raise ValueError(f"scores must have shape {shape[:1]} (one score per row of logprobs); "
                         f"got {describe(scores)}")
    check_same_device(("logprobs", "ref_logprobs", "values", "response_mask", "scores"), logprobs, ref_logprobs, values,
                      response_mask, scores)
    kl_coef = check_number("kl_coef", kl_coef, low=0.0)
    gamma, lam = check_discount(gamma, lam)
    kind = check_choice("estimator", estimator, ESTIMATORS)
    whiten = check_flag("whiten", whiten)
    chosen = _registry.select_backend("ppo_advantages", logprobs.device, backend)
    scores, logprobs, ref_logprobs, values = map(detached, (scores, logprobs, ref_logprobs, values))
    if chosen == "reference":
        return reference(scores, logprobs, ref_logprobs, values, response_mask, kl_coef=kl_coef, gamma=gamma,
                         lam=lam, estimator=estimator, whiten=whiten)
    if estimator == "low_var_kl":  # k3 (kind) with veRL's clamps
        (lo, hi), (out_lo, out_hi) = LOW_VAR_KL_CLAMP, LOW_VAR_KL_OUTPUT_CLAMP
    else:
        lo, hi = out_lo, out_hi = -NO_BOUND, NO_BOUND
    logprobs, ref_logprobs, values = as_rows(logprobs, ref_logprobs, values)
    acc = accumulate_dtype(logprobs.dtype)
    if scores.dtype != acc or not scores.is_contiguous():
        scores = scores.to(acc).contiguous()
    params = PpoAdvantagesParams(kl_coef, gamma, lam, kind, lo, hi, out_lo, out_hi, whiten)
    return _forward(scores, logprobs, ref_logprobs, values, kernel_mask(response_mask), params=params, backend=chosen)
