"""gae, masked_whiten and the fused ppo_advantages: the post-rollout step of RLHF-PPO.

None of these carry a gradient (every stack computes them under no_grad): inputs are detached.
The compiled backends run as the custom ops ``cai_kernels::gae``, ``cai_kernels::masked_whiten`` and
``cai_kernels::ppo_advantages`` (with fake implementations), so torch.compile traces callers
without a graph break.
"""

from __future__ import annotations

import torch

from .. import _registry
from .._extension import cpu_kernels
from .._validation import _describe, check_float_tensor
from ..reference import ppo as reference
from ._ppo_args import (accumulate_dtype, as_rows, call_kernel_directly, check_bounds, check_choice, check_flag,
                        check_mask, check_number, check_rows, check_same_device, detached, kernel_mask,
                        unit_stride_rows)
from .kl_penalty import ESTIMATOR_CODES


def _kernels(backend: str):
    if backend == "cpu":
        return cpu_kernels
    from ..triton import ppo
    return ppo


def _empty_like_rows(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=accumulate_dtype(x.dtype))


@torch.library.custom_op("cai_kernels::gae", mutates_args=())
def _gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels(backend).gae_fwd(rewards, values, mask, gamma, lam)


@_gae.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    return _empty_like_rows(rewards), _empty_like_rows(rewards)


@torch.library.custom_op("cai_kernels::masked_whiten", mutates_args=())
def _masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float,
                   backend: str) -> torch.Tensor:
    return _kernels(backend).masked_whiten_fwd(x, mask, shift_mean, unbiased, eps)


@_masked_whiten.register_fake
def _(x, mask, shift_mean, unbiased, eps, backend):
    return _empty_like_rows(x)


@torch.library.custom_op("cai_kernels::ppo_advantages", mutates_args=())
def _ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float, gamma: float, lam: float, estimator: int, lo: float,
                    hi: float, out_lo: float, out_hi: float, whiten: bool, backend: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(backend).ppo_advantages_fwd(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam,
                                                estimator, lo, hi, out_lo, out_hi, whiten)


@_ppo_advantages.register_fake
def _(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, estimator, lo, hi, out_lo, out_hi,
      whiten, backend):
    return tuple(_empty_like_rows(logprobs) for _ in range(4))


def _check_discount(gamma, lam) -> tuple[float, float]:
    return check_number("gamma", gamma, low=0.0, high=1.0), check_number("lam", lam, low=0.0, high=1.0)


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
    check_same_device(rewards=rewards, values=values, response_mask=response_mask)
    gamma, lam = _check_discount(gamma, lam)
    chosen = _registry.select_backend("gae", rewards.device, backend)
    rewards, values = detached(rewards), detached(values)
    if chosen == "reference":
        return reference.gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    args = (*as_rows(rewards, values), kernel_mask(response_mask), gamma, lam)
    if call_kernel_directly():
        return _kernels(chosen).gae_fwd(*args)
    return _gae(*args, chosen)


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
    check_same_device(x=x, response_mask=response_mask)
    shift_mean, unbiased = check_flag("shift_mean", shift_mean), check_flag("unbiased", unbiased)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    chosen = _registry.select_backend("masked_whiten", x.device, backend)
    x = detached(x)
    if chosen == "reference":
        return reference.masked_whiten(x, response_mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    args = (unit_stride_rows(x), kernel_mask(response_mask), shift_mean, unbiased, eps)
    if call_kernel_directly():
        return _kernels(chosen).masked_whiten_fwd(*args)
    return _masked_whiten(*args, chosen)


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
                         f"got {_describe(scores)}")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, response_mask=response_mask,
                      scores=scores)
    kl_coef = check_number("kl_coef", kl_coef, low=0.0)
    gamma, lam = _check_discount(gamma, lam)
    check_choice("estimator", estimator, reference.ESTIMATORS)
    whiten = check_flag("whiten", whiten)
    chosen = _registry.select_backend("ppo_advantages", logprobs.device, backend)
    scores, logprobs, ref_logprobs, values = map(detached, (scores, logprobs, ref_logprobs, values))
    if chosen == "reference":
        return reference.ppo_advantages(scores, logprobs, ref_logprobs, values, response_mask, kl_coef=kl_coef,
                                        gamma=gamma, lam=lam, estimator=estimator, whiten=whiten)
    lo, hi = check_bounds("clamp", None)
    out_lo, out_hi = lo, hi
    if estimator == "low_var_kl":
        estimator = "k3"
        (lo, hi), (out_lo, out_hi) = reference.LOW_VAR_KL_CLAMP, reference.LOW_VAR_KL_OUTPUT_CLAMP
    logprobs, ref_logprobs, values = as_rows(logprobs, ref_logprobs, values)
    scores = scores.to(accumulate_dtype(logprobs.dtype)).contiguous()
    args = (scores, logprobs, ref_logprobs, values, kernel_mask(response_mask), kl_coef, gamma, lam,
            ESTIMATOR_CODES[estimator], lo, hi, out_lo, out_hi, whiten)
    if call_kernel_directly():
        return _kernels(chosen).ppo_advantages_fwd(*args)
    return _ppo_advantages(*args, chosen)
