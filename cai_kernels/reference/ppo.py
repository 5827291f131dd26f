"""Reference PPO ops in plain PyTorch: KL estimators, GAE, whitening, reward shaping, clipped losses.

The definitions the kernels are tested against, written to read like the math (CleanRL style).
Conventions shared by every PPO op:
  * tensors are (B, T): one row per sequence, one column per response position;
  * ``response_mask`` (B, T) is 1 (nonzero / True) on response tokens and 0 elsewhere: padding on
    either side, prompt or observation tokens between turns ("holes"); values at masked positions
    (even NaN or inf) never reach an unmasked output;
  * math in fp32 whatever the input dtype (fp64 for fp64 inputs), outputs in that dtype;
  * a mean over masked elements is 0 when there are none (never NaN).
"""

from __future__ import annotations

import torch


ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# log(pi / pi_old) is clamped to this range before exp() in the policy loss (as veRL does): the
# ratio stays within [2e-9, 4.9e8], so no inf, and no NaN from inf * 0.
LOG_RATIO_LIMIT = 20.0
# veRL's "low_var_kl": k3 with the log-ratio clamped to +-20 and the estimate clamped to +-10.
LOW_VAR_KL_CLAMP = (-20.0, 20.0)
LOW_VAR_KL_OUTPUT_CLAMP = (-10.0, 10.0)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _clamp(x: torch.Tensor, bounds: tuple[float | None, float | None] | None) -> torch.Tensor:
    if bounds is None:
        return x
    lo, hi = bounds
    return x.clamp(min=lo, max=hi)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *,
               clamp: tuple[float | None, float | None] | None = None,
               output_clamp: tuple[float | None, float | None] | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    With r = logprobs - ref_logprobs, clamped to ``clamp`` = (lo, hi) if given:
        k1  = r
        k2  = r^2 / 2
        k3  = exp(-r) - 1 + r  = expm1(-r) + r   (>= 0; the expm1 form keeps small |r| exact)
        abs = |r|
    then the estimate is clamped to ``output_clamp`` if given. "low_var_kl" is k3 with veRL's
    clamps (log-ratio to +-20, estimate to +-10) unless other clamps are given.
    """
    if estimator == "low_var_kl":
        estimator = "k3"
        clamp = LOW_VAR_KL_CLAMP if clamp is None else clamp
        output_clamp = LOW_VAR_KL_OUTPUT_CLAMP if output_clamp is None else output_clamp
    dtype = compute_dtype(logprobs, ref_logprobs)
    log_ratio = _clamp(logprobs.to(dtype) - ref_logprobs.to(dtype), clamp)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    elif estimator == "abs":
        kl = log_ratio.abs()
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
    return _clamp(kl, output_clamp)


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: the reverse loop over time steps that PPO stacks write.

    On response tokens, walking t from T-1 down to 0:
        delta_t   = rewards_t + gamma * next_value - values_t
        running_t = delta_t + gamma * lam * running_{t+1}
    where next_value is the value of the next *response* token (0 after the last one). Masked
    positions are skipped: next_value and the running advantage are carried through them unchanged
    (veRL's skip-and-carry, for multi-turn masks with holes); for right-padded responses whose padded
    rewards and values are 0 this is exactly the usual loop. Rewards and values at masked positions
    are never read.

    Returns (advantages, returns), (B, T) fp32 (fp64 for fp64 inputs):
        advantages = running_t on response tokens, 0 on masked positions;
        returns    = advantages + values on response tokens, 0 on masked positions.
    """
    dtype = compute_dtype(rewards, values)
    rewards, values = rewards.to(dtype), values.to(dtype)
    mask = response_mask != 0
    batch, steps = rewards.shape
    next_value = rewards.new_zeros(batch)
    running = rewards.new_zeros(batch)
    advantages = rewards.new_zeros(batch, steps)
    for t in reversed(range(steps)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, running, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def masked_moments(x: torch.Tensor, response_mask: torch.Tensor, *, unbiased: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, variance) of ``x`` over all masked-in elements of the batch (two passes).

    Empty mask: mean 0, variance 0. A single element with ``unbiased``: variance 0 (Bessel's
    correction is undefined there; TRL raises, we return the biased value).
    """
    mask = response_mask != 0
    count = mask.sum()
    n = count.clamp(min=1).to(x.dtype)
    mean = torch.where(mask, x, 0.0).sum() / n
    squares = torch.where(mask, (x - mean).square(), 0.0).sum()
    denominator = (count - 1).clamp(min=1).to(x.dtype) if unbiased else n
    return count, mean, squares / denominator


def masked_whiten(x: torch.Tensor, response_mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over *all* masked-in elements of the batch.

    As TRL's and veRL's ``masked_whiten``: batch-global statistics, unbiased variance by default,
    ``shift_mean=False`` adds the mean back. Masked positions are 0 in the output (TRL leaves
    whitened padding garbage there). (B, T) in, (B, T) fp32 (fp64 for fp64) out.
    """
    x = x.to(compute_dtype(x))
    _, mean, var = masked_moments(x, response_mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(response_mask != 0, whitened, 0.0)


def last_token_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """True at each row's last response token (none in a row without response tokens)."""
    mask = response_mask != 0
    return mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))


def shape_rewards(kl: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor, *,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO: -kl_coef * kl on response tokens, plus the sequence's score
    at its last response token (TRL / OpenRLHF ``compute_rewards``); 0 on masked positions."""
    mask = response_mask != 0
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    return rewards + torch.where(last_token_mask(response_mask), scores.to(kl.dtype)[:, None], 0.0)


def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   values: torch.Tensor, response_mask: torch.Tensor, *, kl_coef: float, gamma: float = 1.0,
                   lam: float = 0.95, estimator: str = "k1", whiten: bool = True):
    """The post-rollout step of RLHF-PPO: KL -> shaped rewards -> GAE -> whitened advantages.

    Returns (advantages, returns, token_rewards, kl), each (B, T): ``kl`` is the per-token estimate
    (0 on masked positions), ``token_rewards`` the shaped rewards, ``returns`` = raw advantages +
    values, ``advantages`` whitened over the batch's response tokens when ``whiten``.
    """
    dtype = compute_dtype(logprobs, ref_logprobs, values)
    logprobs, ref_logprobs, values = logprobs.to(dtype), ref_logprobs.to(dtype), values.to(dtype)
    kl = torch.where(response_mask != 0, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    token_rewards = shape_rewards(kl, scores, response_mask, kl_coef=kl_coef)
    advantages, returns = gae(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns, token_rewards, kl


def agg_loss(loss: torch.Tensor, response_mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over response tokens.

      token-mean           sum of all token losses / number of response tokens
      seq-mean-token-mean  each row's token mean, averaged over rows that have response tokens
      seq-mean-token-sum   each row's token sum, averaged over rows that have response tokens
    Rows without response tokens are left out of the seq-mean modes (veRL's plain mean would make
    them NaN); with no response token at all the loss is 0.
    """
    mask = response_mask != 0
    token_sums = torch.where(mask, loss, 0.0).sum(-1)
    counts = mask.sum(-1).to(loss.dtype)
    if agg == "token-mean":
        return token_sums.sum() / counts.sum().clamp(min=1)
    nonempty = counts > 0
    rows = nonempty.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return torch.where(nonempty, token_sums / counts.clamp(min=1), 0.0).sum() / rows
    if agg == "seq-mean-token-sum":
        return token_sums.sum() / rows
    raise ValueError(f"agg must be one of {AGG_MODES}; got {agg!r}")


def masked_mean(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask != 0
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: float | None = None, agg: str = "token-mean"):
    """PPO's clipped surrogate objective, as a loss to minimize (veRL ``compute_policy_loss``).

    Per response token, with log_ratio = clamp(logprobs - old_logprobs, -20, 20) (before exp: no
    inf, no NaN) and ratio = exp(log_ratio):
        loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    and with dual-clip PPO (Ye et al. 2020, ``dual_clip`` = c > 1), for A < 0:
        loss_t = min(loss_t, -A * c)
    aggregated by ``agg`` (see ``agg_loss``). Returns (loss, stats), stats 0-d tensors over response
    tokens: clipfrac (the clipped branch is taken), dual_clipfrac (the dual clip bound is taken),
    approx_kl = mean((ratio - 1) - log_ratio) (k3 of KL(old || new), CleanRL's approx_kl) and
    approx_kl_k1 = mean(-log_ratio) (veRL's ppo_kl).
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    advantages = advantages.to(dtype)
    log_ratio = (logprobs.to(dtype) - old_logprobs.to(dtype)).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).to(dtype), response_mask)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        dual_clipfrac = masked_mean(dual.to(dtype), response_mask)
    else:
        dual_clipfrac = torch.zeros((), dtype=dtype, device=logprobs.device)
    stats = {
        "clipfrac": clipfrac,
        "dual_clipfrac": dual_clipfrac,
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, response_mask),
        "approx_kl_k1": masked_mean(-log_ratio, response_mask),
    }
    return agg_loss(loss, response_mask, agg), {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   response_mask: torch.Tensor, *, clip: float | None = 0.2, agg: str = "token-mean"):
    """PPO's clipped value loss (TRL / veRL ``compute_value_loss``).

    Per response token, with values_clipped = clamp(values, old_values - clip, old_values + clip):
        loss_t = 0.5 * max((values - returns)^2, (values_clipped - returns)^2)
    (``clip=None``: 0.5 * (values - returns)^2), aggregated by ``agg``. Returns (loss, clipfrac),
    clipfrac the fraction of response tokens where the clipped term is the larger.
    """
    dtype = compute_dtype(values, old_values, returns)
    values, old_values, returns = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * agg_loss(unclipped, response_mask, agg), torch.zeros((), dtype=dtype, device=values.device)
    values_clipped = torch.clamp(values, old_values - clip, old_values + clip)
    clipped = (values_clipped - returns).square()
    loss = 0.5 * agg_loss(torch.maximum(unclipped, clipped), response_mask, agg)
    return loss, masked_mean((clipped > unclipped).to(dtype), response_mask).detach()
