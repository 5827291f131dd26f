"""kl_penalty in plain PyTorch: Schulman's per-token KL estimators (the PPO ops' conventions:
``cai_kernels/reference/__init__.py``)."""

from __future__ import annotations

import math

import torch

from .._params import ESTIMATORS, LOW_VAR_KL_CLAMP, LOW_VAR_KL_OUTPUT_CLAMP
from .._validation import compute_dtype


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
        k3  = exp(-r) - 1 + r  = expm1(-r) + r   (>= 0; the expm1 form keeps small |r| exact; +inf at r = -inf)
        abs = |r|
    then the estimate is clamped to ``output_clamp`` if given. "low_var_kl" is k3 with veRL's
    clamps (log-ratio to +-20, estimate to +-10) unless other clamps are given.
    """
    if estimator == "low_var_kl":
        estimator = "k3"
        clamp = LOW_VAR_KL_CLAMP if clamp is None else clamp
        output_clamp = LOW_VAR_KL_OUTPUT_CLAMP if output_clamp is None else output_clamp
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}; got {estimator!r}")
    dtype = compute_dtype(logprobs, ref_logprobs)
    log_ratio = _clamp(logprobs.to(dtype) - ref_logprobs.to(dtype), clamp)
    if output_clamp is not None:
        # Where the output clamp bites the estimate is a constant: its gradient is 0, also where the
        # estimator's own derivative is infinite (k3 at r < -88 in fp32), which autograd would turn into
        # 0 * inf = NaN. So the estimate is taken of a detached log-ratio there.
        with torch.no_grad():
            estimate = _estimate(log_ratio, estimator)
            lo, hi = output_clamp
            bites = ~((estimate >= (-math.inf if lo is None else lo)) & (estimate <= (math.inf if hi is None else hi)))
        log_ratio = torch.where(bites, log_ratio.detach(), log_ratio)
    return _clamp(_estimate(log_ratio, estimator), output_clamp)


def _estimate(r: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r.square()
    if estimator == "abs":
        return r.abs()
    # k3 -> +inf as r -> -inf (a token the policy can never sample), where expm1(-r) + r would be
    # inf - inf. Each branch of the where sees only the values it is taken at, so neither turns a zero
    # gradient into 0 * inf = NaN; at r = -inf the gradient 1 - e^-r is -inf, as the kernels give.
    minus_inf = r == -math.inf
    at_minus_inf, elsewhere = torch.where(minus_inf, r, 0.0), torch.where(minus_inf, 0.0, r)
    return torch.where(minus_inf, torch.expm1(-at_minus_inf), torch.expm1(-elsewhere) + elsewhere)
