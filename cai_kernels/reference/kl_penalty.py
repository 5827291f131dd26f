"""kl_penalty in plain PyTorch: Schulman's per-token KL estimators (the PPO ops' conventions:
``cai_kernels/reference/__init__.py``)."""

from __future__ import annotations

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
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}; got {estimator!r}")
    return _clamp(kl, output_clamp)
