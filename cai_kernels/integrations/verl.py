"""Drop-in replacements for veRL's PPO math (checked against veRL 0.9.1).

Same names, signatures, return types and semantics as ``verl.utils.torch_functional`` and
``verl.trainer.ppo.core_algos``:

  logprobs_from_logits(logits, labels, inplace_backward=True) -> (...) in the logits' dtype
  entropy_from_logits(logits) -> (...) in the logits' dtype
  masked_whiten(values, mask, shift_mean=True)
      (values - mean) * rsqrt(var + 1e-8), mean and unbiased variance over the mask's elements;
      ValueError (veRL's messages) when the mask has 0 or 1 elements.
  kl_penalty(logprob, ref_logprob, kl_penalty)
      "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (k3 with the log-ratio clamped to [-20, 20] and
      the estimate to [-10, 10]: veRL's "k3" *is* low_var_kl), each with an optional "+" suffix
      (value of the estimator, gradient of k2: straight-through); "full" raises NotImplementedError.
  compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam)
      skip-and-carry GAE over response tokens (observation tokens between turns are skipped, the
      next value and the running advantage carried through them), advantages whitened.
  compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None)
      clipped surrogate (clip_ratio_low / clip_ratio_high) with dual clip (clip_ratio_c), aggregated
      by veRL's ``agg_loss`` rules incl. ``config.global_batch_info``; metrics pg_clipfrac, ppo_kl,
      pg_clipfrac_lower as Python floats.
  compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                     dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)

Dtypes are veRL's for every input dtype (see ``_common``): its GAE, policy and value losses follow
the promotion of its arithmetic (a float32 ``response_mask`` makes bf16 results fp32, the seq-mean
modes are fp32, ``vf_clipfrac`` is fp32). veRL's GAE raises on a bool ``response_mask`` (``1 - mask``);
ours accepts it (result dtype: the rewards' and values').

One difference, by design of our ops: at positions where the mask is 0, ``masked_whiten``, the GAE
advantages and returns are 0, where veRL leaves whitened / carried values that no consumer reads
(its losses and metrics all mask them out). Our ``masked_whiten`` and ``gae`` have no option to fill
masked positions; everything on response tokens is equal.

``apply_to_verl()`` patches these into the installed veRL (incl. the "vanilla" policy-loss and
"gae" advantage registries) and returns an undo handle. Importing this module does not import veRL.
Not covered (veRL's own code runs when patched): ``rollout_is_weights`` (``ppo_policy_loss`` takes no
per-token weights), gamma / lam outside [0, 1].
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._common import dtype_key, global_agg_scale, key_probe, mask_count, result_dtype
from ._patching import PatchHandle, Target, Unsupported, apply_targets, with_fallback

__all__ = ["logprobs_from_logits", "entropy_from_logits", "masked_whiten", "kl_penalty",
           "compute_gae_advantage_return", "compute_policy_loss_vanilla", "compute_value_loss", "apply_to_verl",
           "Unsupported"]

WHITEN_EPS = 1e-8
_ESTIMATORS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl",
               "k3": "low_var_kl"}
_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """log p(labels) under softmax(logits): (..., V), (...) -> (...) in the logits' dtype, one fused pass.

    ``inplace_backward`` (flash-attn's option) is accepted and has no effect: the backward never
    holds more than the logits' gradient.
    """
    import cai_kernels

    return cai_kernels.token_logprobs(logits, labels.long()).to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): (..., V) -> (...) in the logits' dtype, differentiable."""
    import cai_kernels

    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = cai_kernels.token_logprobs(logits, targets, return_entropy=True)
    return entropy.to(logits.dtype)


def _check_whiten_mask(mask: torch.Tensor) -> None:
    count = int((mask != 0).sum())  # veRL's own data-dependent check (a host sync, as in veRL)
    if count == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if count == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """veRL's ``masked_whiten``: batch-global mean / unbiased variance over the mask, eps 1e-8.

    (B, T) in, (B, T) in the values' dtype out; 0 where the mask is 0 (see module doc).
    """
    import cai_kernels

    if values.ndim != 2:
        raise Unsupported("values of shape (B, T) only")
    _check_whiten_mask(mask)
    out = cai_kernels.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=WHITEN_EPS)
    return out.to(values.dtype)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """veRL's per-token KL estimate (see module doc for the names); in the inputs' promoted dtype."""
    import cai_kernels

    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if base == "full":
        raise NotImplementedError  # as veRL: needs the full distributions
    if base not in _ESTIMATORS:
        raise NotImplementedError
    dtype = result_dtype(logprob, ref_logprob)
    forward = cai_kernels.kl_penalty(logprob, ref_logprob, _ESTIMATORS[base]).to(dtype)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward
    # the value of the chosen estimator, the (unbiased) gradient of k2
    backward = cai_kernels.kl_penalty(logprob, ref_logprob, "k2").to(dtype)
    return backward - backward.detach() + forward.detach()


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma: torch.Tensor | float,
                                 lam: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's GAE: skip-and-carry over the response mask, then whitened advantages.

    (B, T) each -> (advantages, returns) (B, T) in the inputs' promoted dtype: returns = raw
    advantages + values, advantages = masked_whiten(raw advantages). Both 0 off the mask.
    """
    import cai_kernels

    gamma, lam = float(gamma), float(lam)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise Unsupported(f"gamma={gamma}, lam={lam}: cai_kernels.gae takes discounts in [0, 1]")
    # veRL's loop multiplies by the mask: a float32 mask promotes bf16 rewards / values to fp32
    dtype = result_dtype(token_level_rewards, values, response_mask)
    with torch.no_grad():
        advantages, returns = cai_kernels.gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam)
        advantages = masked_whiten(advantages, response_mask)
    return advantages.to(dtype), returns.to(dtype)


def _agg_args(loss_agg_mode: str) -> str:
    """Our op's agg mode for a veRL mode; token-sum and -norm are rescaled from it (`_to_verl_agg`)."""
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return {"token-sum": "token-mean", "seq-mean-token-sum-norm": "seq-mean-token-sum"}.get(loss_agg_mode,
                                                                                           loss_agg_mode)


def _to_verl_agg(loss: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
                 batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """Rescale our op's local reduction to veRL's ``agg_loss`` (global counts, dp_size, token-sum, -norm)."""
    if loss_agg_mode == "token-sum":  # local token sum * dp_size
        return loss * mask_count(mask).clamp(min=1) * dp_size
    ours = _agg_args(loss_agg_mode)
    denominator = batch_num_tokens if ours == "token-mean" else global_batch_size
    if denominator is None and dp_size > 1:
        what = "batch_num_tokens" if ours == "token-mean" else "global_batch_size"
        raise ValueError(f"(global) {what} is required when dp_size > 1")
    if denominator is not None:
        loss = loss * global_agg_scale(mask, ours, denominator, dp_size)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
    return loss


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask.bool(), values, 0.0) * mask).sum()


def _agg_loss_dtype(loss: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, batch_num_tokens,
                    global_batch_size) -> torch.dtype:
    """veRL's ``agg_loss`` arithmetic replayed on probes: the dtype of its result."""
    if loss_agg_mode == "token-mean":
        denominator = mask.sum() if batch_num_tokens is None else key_probe(batch_num_tokens, dims=0)
        return (_masked_sum(loss, mask) / denominator).dtype
    if loss_agg_mode == "token-sum":
        return _masked_sum(loss, mask).dtype
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss * mask, dim=-1) / (torch.sum(mask, dim=-1) + 1e-8)
    else:  # seq-mean-token-sum(-norm)
        seq_losses = torch.sum(loss * mask, dim=-1)
    seq_mask = (torch.sum(mask, dim=-1) > 0).float()
    denominator = seq_mask.sum() if global_batch_size is None else key_probe(global_batch_size, dims=0)
    return (_masked_sum(seq_losses, seq_mask) / denominator).dtype


@functools.lru_cache(maxsize=None)
def _policy_loss_dtype(log_prob, old_log_prob, advantages, mask, loss_agg_mode, batch_num_tokens,
                       global_batch_size) -> torch.dtype:
    """compute_policy_loss_vanilla's loss dtype (arguments: `dtype_key`s)."""
    lp, old, adv = (key_probe(k, dims=2) for k in (log_prob, old_log_prob, advantages))
    pg_losses = -adv * torch.exp(torch.clamp(lp - old, min=-20.0, max=20.0))
    return _agg_loss_dtype(pg_losses, key_probe(mask, dims=2), loss_agg_mode, batch_num_tokens, global_batch_size)


@functools.lru_cache(maxsize=None)
def _value_loss_dtypes(vpreds, returns, values, mask, loss_agg_mode, batch_num_tokens,
                       global_batch_size) -> tuple[torch.dtype, torch.dtype]:
    """compute_value_loss's (vf_loss, vf_clipfrac) dtypes (arguments: `dtype_key`s)."""
    v, ret, old = (key_probe(k, dims=2) for k in (vpreds, returns, values))
    mask = key_probe(mask, dims=2)
    losses = torch.max((v - ret) ** 2, (torch.clamp(v, old - 0.2, old + 0.2) - ret) ** 2)
    loss_dtype = _agg_loss_dtype(losses, mask, loss_agg_mode, batch_num_tokens, global_batch_size)  # 0.5 * it
    clipfrac = _masked_sum(torch.gt(losses, losses).float(), mask) / (mask.sum() + 1e-8)
    return loss_dtype, clipfrac.dtype


def _config_get(config, name: str, default):
    getter = getattr(config, "get", None)
    value = getter(name, default) if callable(getter) else getattr(config, name, default)
    return default if value is None else value


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Any = None, rollout_is_weights: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """veRL's vanilla PPO policy loss with dual clip; ``cai_kernels.ppo_policy_loss`` underneath.

    config: veRL's ActorConfig (clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c,
    global_batch_info). Returns (loss 0-d, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower": float}).
    """
    import cai_kernels

    assert config is not None
    if rollout_is_weights is not None:
        raise Unsupported("rollout_is_weights: cai_kernels.ppo_policy_loss takes no per-token weights")
    clip_ratio = config.clip_ratio
    clip_low = _config_get(config, "clip_ratio_low", clip_ratio)
    clip_high = _config_get(config, "clip_ratio_high", clip_ratio)
    clip_c = _config_get(config, "clip_ratio_c", 3.0)
    assert clip_c > 1.0, ("The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
                          + f" but get the value: {clip_c}.")
    ours = _agg_args(loss_agg_mode)
    loss, stats = cai_kernels.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=clip_low,
                                              clip_high=clip_high, dual_clip=clip_c, agg=ours)
    info = dict(getattr(config, "global_batch_info", None) or {})
    loss = _to_verl_agg(loss, response_mask, loss_agg_mode, **info)
    metrics = {"actor/pg_clipfrac": stats["clipfrac"].item(), "actor/ppo_kl": stats["approx_kl_k1"].item(),
               "actor/pg_clipfrac_lower": stats["dual_clipfrac"].item()}
    dtype = _policy_loss_dtype(dtype_key(log_prob), dtype_key(old_log_prob), dtype_key(advantages),
                               dtype_key(response_mask), loss_agg_mode, dtype_key(info.get("batch_num_tokens")),
                               dtype_key(info.get("global_batch_size")))
    return loss.to(dtype), metrics


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens: int | None = None, global_batch_size: int | None = None,
                       loss_scale_factor: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's clipped value loss: 0.5 * agg(max((vpreds - R)^2, (clip(vpreds, values +- c) - R)^2)).

    Returns (vf_loss 0-d, vf_clipfrac 0-d tensor: share of response tokens where the clipped term is larger).
    """
    import cai_kernels

    ours = _agg_args(loss_agg_mode)
    loss, clipfrac = cai_kernels.ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                                                agg=ours)
    loss = _to_verl_agg(loss, response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                        loss_scale_factor)
    loss_dtype, clipfrac_dtype = _value_loss_dtypes(dtype_key(vpreds), dtype_key(returns), dtype_key(values),
                                                    dtype_key(response_mask), loss_agg_mode,
                                                    dtype_key(batch_num_tokens), dtype_key(global_batch_size))
    return loss.to(loss_dtype), clipfrac.to(clipfrac_dtype)


def _targets() -> list[Target]:
    """Everything apply_to_verl replaces (registries follow by identity), each wrapping veRL's original."""
    sources = {"verl.utils.torch_functional": (logprobs_from_logits, entropy_from_logits, masked_whiten),
               "verl.trainer.ppo.core_algos": (kl_penalty, compute_gae_advantage_return, compute_policy_loss_vanilla,
                                               compute_value_loss)}
    return [Target(module, fn.__name__, functools.partial(with_fallback, fn))
            for module, adapters in sources.items() for fn in adapters]


def apply_to_verl() -> PatchHandle:
    """Patch the installed veRL to compute with cai_kernels; returns an undo handle.

    Patches the functions above wherever veRL imported them, and the entries of its registries
    that hold them (``POLICY_LOSS_REGISTRY["vanilla"]``, ``ADV_ESTIMATOR_REGISTRY["gae"]``). Calls
    with options we do not cover run veRL's own code. What cannot be patched (a veRL module that
    fails to import) is listed in ``handle.not_patched`` and named in a `PatchWarning`.
    """
    return apply_targets("verl", _targets(), ["verl", "verl.utils.torch_functional", "verl.trainer.ppo.core_algos"])
