"""Statistics of the evaluation: win rates and Elo scores with bootstrap confidence intervals.

Elo scores come from a Bradley-Terry fit, P(i preferred to j) = sigmoid(s_i - s_j), Elo = s * 400 / ln 10 (a
difference of 400 Elo = odds of 10:1), anchored so that one model scores 0. The fit takes soft outcomes: the
judge gives a probability per comparison, not a winner (the small BT packages, e.g. choix, fit hard
win/loss counts only), so it is written here: Newton steps on the log-likelihood
sum_c w_c [p_c log sigmoid(s_i - s_j) + (1 - p_c) log sigmoid(s_j - s_i)] with a tiny ridge that keeps the fit
finite when one model wins every comparison. Confidence intervals: percentile bootstrap over prompts (every
comparison of a resampled prompt comes along, so the spread includes the prompts' variety), numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values, *, samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def fit_bradley_terry(n_models: int, first, second, p_first, weights=None, *, ridge: float = 1e-3,
                      iterations: int = 50) -> np.ndarray:
    """Bradley-Terry scores s (n_models,), natural units, mean 0, from soft outcomes.

    first, second: model indices of each comparison; p_first: probability (0..1) that `first` was preferred;
    weights: how often each comparison counts (bootstrap multiplicities), default 1.
    """
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    p = np.asarray(p_first, dtype=np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    s = np.zeros(n_models)
    for _ in range(iterations):
        prob = 1.0 / (1.0 + np.exp(-(s[first] - s[second])))
        residual = w * (p - prob)
        grad = -ridge * s
        np.add.at(grad, first, residual)
        np.add.at(grad, second, -residual)
        curvature = w * prob * (1 - prob)
        hessian = -ridge * np.eye(n_models)
        np.add.at(hessian, (first, first), -curvature)
        np.add.at(hessian, (second, second), -curvature)
        np.add.at(hessian, (first, second), curvature)
        np.add.at(hessian, (second, first), curvature)
        step = np.linalg.solve(hessian, grad)
        s = s - step
        if np.max(np.abs(step)) < 1e-9:
            break
    return s - s.mean()


@dataclass
class EloResult:
    """Elo per model (anchor = 0), with 95 % bootstrap intervals; diff_ci[(a, b)]: interval of Elo_a - Elo_b."""
    models: list[str]
    elo: dict[str, float]
    ci: dict[str, tuple[float, float]]
    diff_ci: dict[tuple[str, str], tuple[float, float]]
    comparisons: int
    prompts: int

    def significant(self, a: str, b: str) -> bool:
        """Whether the interval of Elo_a - Elo_b excludes 0."""
        lo, hi = self.diff_ci[(a, b)]
        return lo > 0 or hi < 0


def elo_scores(comparisons: list[dict], models: list[str], *, anchor: str | None = None, samples: int = 1000,
               seed: int = 0, level: float = 0.95) -> EloResult:
    """Elo scores of `models` from comparisons {"a", "b", "p_a", "prompt_id"} (p_a: a preferred), bootstrapped
    over prompts. `anchor` scores 0 (default: the first model)."""
    index = {m: k for k, m in enumerate(models)}
    rows = [c for c in comparisons if c["a"] in index and c["b"] in index]
    anchor_index = index[anchor if anchor is not None else models[0]]
    prompts = sorted({c["prompt_id"] for c in rows})
    if not rows:
        nan = (float("nan"), float("nan"))
        return EloResult(models, {m: float("nan") for m in models}, {m: nan for m in models},
                         {(a, b): nan for a in models for b in models}, 0, 0)
    first = np.array([index[c["a"]] for c in rows])
    second = np.array([index[c["b"]] for c in rows])
    p = np.array([c["p_a"] for c in rows], dtype=np.float64)
    cluster = np.array([prompts.index(c["prompt_id"]) for c in rows])

    def fit(weights=None):
        s = fit_bradley_terry(len(models), first, second, p, weights)
        return (s - s[anchor_index]) * ELO_SCALE

    point = fit()
    rng = np.random.default_rng(seed)
    draws = np.empty((samples, len(models)))
    for k in range(samples):
        counts = np.bincount(rng.integers(0, len(prompts), size=len(prompts)), minlength=len(prompts))
        draws[k] = fit(counts[cluster])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)
    diff_ci = {}
    for a in models:
        for b in models:
            d = draws[:, index[a]] - draws[:, index[b]]
            diff_ci[(a, b)] = (float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail)))
    return EloResult(models, {m: float(point[index[m]]) for m in models},
                     {m: (float(lo[index[m]]), float(hi[index[m]])) for m in models}, diff_ci, len(rows), len(prompts))


def win_rate(comparisons: list[dict], a: str, b: str, *, samples: int = 1000, seed: int = 0
             ) -> tuple[float, float, float, int]:
    """(mean P(a preferred to b), low, high, n prompts): comparisons of a vs b in either slot, averaged per prompt
    and bootstrapped over prompts."""
    per_prompt: dict[str, list[float]] = {}
    for c in comparisons:
        if (c["a"], c["b"]) == (a, b):
            per_prompt.setdefault(c["prompt_id"], []).append(c["p_a"])
        elif (c["a"], c["b"]) == (b, a):
            per_prompt.setdefault(c["prompt_id"], []).append(1.0 - c["p_a"])
    values = [sum(v) / len(v) for v in per_prompt.values()]
    mean, lo, hi = bootstrap_mean(values, samples=samples, seed=seed)
    return mean, lo, hi, len(values)
