"""The inputs of the backend fuzz test (``tests/test_fuzz_backends.py``): for every op, a builder that turns a
random generator, an input class and a dtype into one call of the op.

Input classes (what the values at the positions an op *reads* look like; every class except "finite" also
puts garbage -- NaN, +-inf, 3e38 -- where the op must not read: masked tokens, ignored rows, padding responses,
entries past ``num_valid``, every position of a sequence but its last real token):
  finite      ordinary values;
  padding     ordinary values, garbage only where the op must not read;
  nan         NaN at some read positions;
  inf         +-inf at some read positions (-inf logits: tokens that can never be produced);
  extreme     finite values at the edge of each op's contract: |logits / T| up to the fp32 range
              (T = 1e-10, logits 1e10 at T 0.7, exact ties far above the rest), rewards up to 3e38, PPO inputs up to 1e30
              (1e18 where the math squares them: value loss), whitening inputs at 1e20 / 1e30 and means of
              1e6-1e8 with unit spread;
  degenerate  edge shapes and masks: all-masked rows or batches, all -inf rows, exact ties, one element.
Builders draw everything from one torch.Generator, so an example is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import cai_kernels as ck

CLASSES = ("finite", "padding", "nan", "inf", "extreme", "degenerate")
GARBAGE = (math.nan, math.inf, -math.inf, 3e38)
IGNORE = -100


@dataclass
class Case:
    """One call: ``call(tensors, backend)`` returns the outputs to compare (a tuple of tensors);
    ``diff`` names the float inputs gradients are taken for, ``grad_outputs`` the indices of the outputs
    that carry them. ``atol`` is the absolute floor of the forward comparison, scaled to the data: one
    value, or one per output."""

    tensors: dict[str, torch.Tensor | None]
    call: Callable
    diff: tuple[str, ...] = ()
    grad_outputs: tuple[int, ...] = ()
    atol: float | tuple[float, ...] = 1e-5
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- random helpers --------------------------------------------------------------------------------

def randint(g, lo: int, hi: int) -> int:
    """An int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def choice(g, options):
    return options[randint(g, 0, len(options) - 1)]


def randn(g, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def coin(g, p: float = 0.5) -> bool:
    return bool(torch.rand((), generator=g) < p)


def some(g, where: torch.Tensor, p: float = 0.3) -> torch.Tensor:
    """A random subset of ``where`` (at least one position when ``where`` has any)."""
    picked = where & (torch.rand(where.shape, generator=g) < p)
    if where.any() and not picked.any():
        flat = where.flatten().nonzero().flatten()
        picked = picked.flatten().clone()
        picked[flat[randint(g, 0, flat.numel() - 1)]] = True
        picked = picked.view(where.shape)
    return picked


def sprinkle(g, x: torch.Tensor, where: torch.Tensor, values, p: float = 0.3) -> torch.Tensor:
    """x with values drawn from ``values`` at a random subset of ``where``."""
    picked = some(g, where, p)
    pool = torch.tensor(values, dtype=x.dtype)
    draws = pool[torch.randint(0, len(values), x.shape, generator=g)]
    return torch.where(picked, draws, x)


def specials(cls: str):
    return {"nan": (math.nan,), "inf": (math.inf, -math.inf)}.get(cls)


def garbage(g, cls: str, x: torch.Tensor, unread: torch.Tensor) -> torch.Tensor:
    """Every class but "finite" fills some never-read positions with garbage."""
    return x if cls == "finite" else sprinkle(g, x, unread, GARBAGE, p=0.6)


def response_mask(g, B: int, T: int, cls: str) -> torch.Tensor:
    """A (B, T) mask of a random dtype the stacks pass (bool, int64, float32): right padding or holes;
    "degenerate" adds empty rows, or an empty batch."""
    steps = torch.arange(T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = steps[None, :] < lengths[:, None]
    if coin(g):
        mask &= torch.rand(B, T, generator=g) < 0.75
    if cls == "degenerate":
        kind = randint(g, 0, 2)
        if kind == 0:
            mask[:] = False
        elif kind == 1:
            mask[randint(g, 0, B - 1)] = False
        else:
            mask[:] = True
    return mask.to(choice(g, (torch.bool, torch.int64, torch.float32)))


def as_dtype(x: torch.Tensor | None, dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def finite_max(*tensors) -> float:
    values = [t[torch.isfinite(t)].abs().max().item() for t in tensors
              if t is not None and torch.isfinite(t).any()]
    return max([1.0, *values])


# ---- the log-prob ops --------------------------------------------------------------------------------

def _logits_rows(g, cls, N, V, *, read_rows):
    """(N, V) logits and a temperature for the class; garbage in the rows that are not read."""
    logits = randn(g, N, V, scale=3.0)
    temperature = choice(g, (1.0, 0.7, 2.5))
    readable = read_rows[:, None].expand(N, V)
    if cls == "extreme":
        mode = randint(g, 0, 3)
        if mode == 0:
            temperature = 1e-10
        elif mode == 1:
            logits, temperature = logits * 1e10, 0.7
        elif mode == 2:  # exact ties at the top, far above the rest; at moderate |z|: the kernels keep the
            # log-sum-exp as one fp32 number, which near |z| = 1e30 cannot hold the log of the number of ties
            top = logits.amax(-1, keepdim=True) + 40.0
            logits = torch.where(some(g, torch.ones(N, V, dtype=torch.bool), 0.3), top, logits)
        else:            # |logits / T| near the top of the fp32 range
            logits, temperature = logits / logits.abs().amax().clamp_min(1e-30) * 3e38, 1.0
    elif cls == "degenerate":
        mode = randint(g, 0, 2)
        if mode == 0:
            logits[randint(g, 0, N - 1)] = -math.inf                    # a row that can produce nothing
        elif mode == 1:
            logits[:] = logits[:, :1]                                   # every token equally likely
        else:
            logits = torch.where(some(g, readable, 0.7), -math.inf, logits)
    elif specials(cls):
        logits = sprinkle(g, logits, readable, specials(cls), p=0.15)
    return garbage(g, cls, logits, ~readable), temperature


def _targets(g, cls, N, V):
    targets = torch.randint(0, V, (N,), generator=g)
    ignored = torch.rand(N, generator=g) < (0.3 if cls != "finite" else 0.0)
    if cls == "padding" and not ignored.any():
        ignored[randint(g, 0, N - 1)] = True
    if cls == "degenerate" and coin(g, 0.3):
        ignored[:] = True
    return torch.where(ignored, IGNORE, targets), ~ignored


def token_logprobs(g, cls, dtype):
    N, V = randint(g, 1, 5), choice(g, (1, 5, 33, 300, 4100) if cls == "extreme" else (1, 5, 33, 300))
    targets, read = _targets(g, cls, N, V)
    logits, temperature = _logits_rows(g, cls, N, V, read_rows=read)
    return Case({"logits": logits.to(dtype), "targets": targets},
                lambda t, b: ck.token_logprobs(t["logits"], t["targets"], temperature=temperature,
                                               ignore_index=IGNORE, return_entropy=True, backend=b),
                diff=("logits",), grad_outputs=(0, 1), note=f"T={temperature}")


def _linear_operands(g, cls, N, H, V, read_rows):
    hidden, weight = randn(g, N, H), randn(g, V, H, scale=3.0 / math.sqrt(H))
    bias = randn(g, V) if coin(g) else None
    temperature = choice(g, (1.0, 0.7, 2.5))
    readable = read_rows[:, None].expand(N, H)
    if cls == "extreme":
        if coin(g):
            temperature = 1e-10
        else:
            weight, temperature = weight * 1e10, 0.7
    elif cls == "degenerate":
        if coin(g):
            bias = torch.full((V,), -math.inf, dtype=torch.float64)     # nothing can be produced
            if V > 1:
                bias[randint(g, 0, V - 1)] = 0.0
        else:
            weight = torch.zeros_like(weight)                           # every token equally likely
    elif cls == "inf":
        bias = sprinkle(g, randn(g, V) if bias is None else bias, torch.ones(V, dtype=torch.bool), (-math.inf,))
        if coin(g, 0.3):
            hidden = sprinkle(g, hidden, readable, (math.inf, -math.inf), p=0.1)
    elif cls == "nan":
        target = choice(g, ("hidden", "weight", "bias"))
        if target == "hidden" or (target == "bias" and bias is None):
            hidden = sprinkle(g, hidden, readable, (math.nan,), p=0.1)
        elif target == "weight":
            weight = sprinkle(g, weight, torch.ones(V, H, dtype=torch.bool), (math.nan,), p=0.05)
        else:
            bias = sprinkle(g, bias, torch.ones(V, dtype=torch.bool), (math.nan,), p=0.1)
    return garbage(g, cls, hidden, ~readable), weight, bias, temperature


def linear_token_logprobs(g, cls, dtype):
    N, H, V = randint(g, 1, 4), choice(g, (1, 8)), choice(g, (3, 40, 1100) if cls == "extreme" else (3, 40))
    targets, read = _targets(g, cls, N, V)
    hidden, weight, bias, temperature = _linear_operands(g, cls, N, H, V, read)
    return Case({"hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": as_dtype(bias, dtype),
                 "targets": targets},
                lambda t, b: ck.linear_token_logprobs(t["hidden"], t["weight"], t["targets"], bias=t["bias"],
                                                      temperature=temperature, ignore_index=IGNORE,
                                                      return_entropy=True, backend=b),
                diff=("hidden", "weight", "bias"), grad_outputs=(0, 1), note=f"T={temperature}")


def choice_logprobs(g, cls, dtype):
    num_options = torch.tensor([randint(g, 1, 3) for _ in range(randint(g, 1, 3))])
    tokens_per_option = torch.randint(1, 4, (int(num_options.sum()),), generator=g)
    option_ids = torch.repeat_interleave(torch.arange(tokens_per_option.numel()), tokens_per_option)
    option_ids = option_ids[torch.randperm(option_ids.numel(), generator=g)]        # any token order
    N, V = option_ids.numel(), choice(g, (5, 40))
    targets = torch.randint(0, V, (N,), generator=g)
    clamp = (0.4, 0.6) if coin(g, 0.3) else None
    everything = torch.ones(N, dtype=torch.bool)
    common = {"targets": targets, "option_ids": option_ids, "num_options": num_options}
    if coin(g):
        logits, temperature = _logits_rows(g, cls, N, V, read_rows=everything)
        tensors = common | {"logits": logits.to(dtype)}
        diff = ("logits",)
    else:
        hidden, weight, bias, temperature = _linear_operands(g, cls, N, choice(g, (1, 8)), V, everything)
        tensors = common | {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": as_dtype(bias, dtype)}
        diff = ("hidden", "weight", "bias")

    def call(t, b):
        return ck.choice_logprobs(t["targets"], t["option_ids"], t["num_options"], logits=t.get("logits"),
                                  hidden=t.get("hidden"), weight=t.get("weight"), bias=t.get("bias"),
                                  temperature=temperature, clamp=clamp, backend=b)

    return Case(tensors, call, diff=diff, grad_outputs=(0, 1), note=f"T={temperature} clamp={clamp}")


# ---- the preference-model ops -------------------------------------------------------------------------

def _rewards(g, cls, shape, read, *, top=(1e38, 3e38, 3.4e38)):
    x = randn(g, *shape, scale=3.0)
    if cls == "extreme":
        x = torch.where(some(g, read, 0.5), torch.sign(x) * torch.tensor(top)[
            torch.randint(0, len(top), shape, generator=g)], x)
    elif cls == "degenerate":
        x = torch.zeros(shape, dtype=torch.float64) + x.flatten()[0]                     # all tied
    elif specials(cls):
        x = sprinkle(g, x, read, specials(cls), p=0.2)
    return garbage(g, cls, x, ~read)


def pairwise_loss(g, cls, dtype):
    N = randint(g, 1, 20)
    everything = torch.ones(N, dtype=torch.bool)
    chosen, rejected = _rewards(g, cls, (N,), everything), _rewards(g, cls, (N,), everything)
    labels = choice(g, (None, 1.0, 0.0, 0.3, "tensor"))
    if labels == "tensor":
        labels = torch.rand(N, generator=g, dtype=torch.float64)
        labels[torch.rand(N, generator=g) < 0.3] = 1.0
    margin = choice(g, (None, 0.5, "tensor"))
    if margin == "tensor":
        margin = randn(g, N)
    reduction = choice(g, ("none", "mean", "sum"))
    tensors = {"chosen": chosen.to(dtype), "rejected": rejected.to(dtype)}
    if isinstance(labels, torch.Tensor):
        tensors["labels"] = labels.to(dtype)
    if isinstance(margin, torch.Tensor):
        tensors["margin"] = margin.to(dtype)

    def call(t, b):
        return (ck.pairwise_loss(t["chosen"], t["rejected"], soft_labels=t.get("labels", labels),
                                 margin=t.get("margin", margin), reduction=reduction, backend=b),)

    return Case(tensors, call, diff=("chosen", "rejected"), grad_outputs=(0,),
                note=f"labels={'tensor' if isinstance(labels, torch.Tensor) else labels} reduction={reduction}")


def _sequences(g, cls, lead, T, H, *, active=None):
    """hidden (*lead, T, H), mask (*lead, T) with a real token in every active sequence, and the positions
    read (each active sequence's last real token); garbage everywhere else."""
    mask = torch.rand(*lead, T, generator=g) < 0.7
    mask[..., 0] |= ~mask.any(-1)
    if cls == "degenerate" and coin(g):
        mask[:] = True
    if active is not None:
        mask &= active[..., None]
    last = torch.where(mask, torch.arange(T), -1).amax(-1)
    read = (torch.arange(T) == last[..., None])[..., None].expand(*lead, T, H)
    hidden = randn(g, *lead, T, H)
    if cls == "extreme":
        hidden = hidden * 1e18
    elif specials(cls):
        hidden = sprinkle(g, hidden, read, specials(cls), p=0.2)
    return garbage(g, cls, hidden, ~read), mask.to(choice(g, (torch.bool, torch.int64)))


def _head(g, cls, H):
    weight = randn(g, H, scale=1.0 / math.sqrt(H)) * (1e18 if cls == "extreme" else 1.0)
    return weight, (randn(g) if coin(g) else None)


def last_token_rewards(g, cls, dtype):
    B, T, H = randint(g, 1, 3), randint(g, 1, 6), choice(g, (1, 4, 17))
    hidden, mask = _sequences(g, cls, (B,), T, H)
    weight, bias = _head(g, cls, H)
    return Case({"hidden": hidden.to(dtype), "mask": mask, "weight": weight.to(dtype), "bias": as_dtype(bias, dtype)},
                lambda t, b: (ck.last_token_rewards(t["hidden"], t["mask"], t["weight"], t["bias"], backend=b),),
                diff=("hidden", "weight", "bias"), grad_outputs=(0,), atol=1e-5 * (1e36 if cls == "extreme" else 1))


def reward_pairwise_loss(g, cls, dtype):
    B, H = randint(g, 1, 3), choice(g, (1, 4))
    chosen, chosen_mask = _sequences(g, cls, (B,), randint(g, 1, 5), H)
    rejected, rejected_mask = _sequences(g, cls, (B,), randint(g, 1, 5), H)
    weight, bias = _head(g, cls, H)
    labels = torch.rand(B, generator=g, dtype=torch.float64) if coin(g) else None
    return Case({"chosen": chosen.to(dtype), "chosen_mask": chosen_mask, "rejected": rejected.to(dtype),
                 "rejected_mask": rejected_mask, "weight": weight.to(dtype), "bias": as_dtype(bias, dtype),
                 "labels": labels},
                lambda t, b: ck.reward_pairwise_loss(t["chosen"], t["chosen_mask"], t["rejected"], t["rejected_mask"],
                                                     t["weight"], t["bias"], soft_labels=t["labels"], backend=b),
                diff=("chosen", "rejected", "weight", "bias"), grad_outputs=(0, 1, 2),
                atol=1e-5 * (1e36 if cls == "extreme" else 1))


def _num_valid(g, cls, B, K):
    if cls in ("finite", "nan", "inf") and coin(g):
        return None
    low = 0 if cls == "degenerate" else 1
    return torch.randint(low, K + 1, (B,), generator=g)


def ranked_pairwise_loss(g, cls, dtype):
    B, K = randint(g, 1, 4), randint(g, 1, 6)
    num_valid = _num_valid(g, cls, B, K)
    read = torch.arange(K) < (K if num_valid is None else num_valid[:, None])
    # up to 1e38: ranked_pairwise_loss's per-row losses are fp32 (the op's output with reduction="none"), so
    # a row whose mean pair loss passes the fp32 range (rewards of +-3e38) is inf even where the mean over
    # rows would not be
    rewards = _rewards(g, cls, (B, K), read.expand(B, K), top=(1e37, 1e38))
    reduction = choice(g, ("none", "mean", "sum"))
    return Case({"rewards": rewards.to(dtype), "num_valid": num_valid},
                lambda t, b: (ck.ranked_pairwise_loss(t["rewards"], num_valid=t["num_valid"], reduction=reduction,
                                                      backend=b),),
                diff=("rewards",), grad_outputs=(0,), note=f"reduction={reduction}")


def reward_ranked_loss(g, cls, dtype):
    B, K, T, H = randint(g, 1, 2), randint(g, 1, 4), randint(g, 1, 4), choice(g, (1, 4))
    num_valid = _num_valid(g, cls, B, K)
    active = torch.arange(K) < (K if num_valid is None else num_valid[:, None])
    hidden, mask = _sequences(g, cls, (B, K), T, H, active=active.expand(B, K))
    weight, bias = _head(g, cls, H)
    return Case({"hidden": hidden.to(dtype), "mask": mask, "weight": weight.to(dtype), "bias": as_dtype(bias, dtype),
                 "num_valid": num_valid},
                lambda t, b: ck.reward_ranked_loss(t["hidden"], t["mask"], t["weight"], t["bias"],
                                                   num_valid=t["num_valid"], backend=b),
                diff=("hidden", "weight", "bias"), grad_outputs=(0, 1), atol=1e-5 * (1e36 if cls == "extreme" else 1))


# ---- the PPO ops ----------------------------------------------------------------------------------------

def _ppo_values(g, cls, x, read, *, extreme=1e30):
    if cls == "extreme":
        x = x * extreme
    elif specials(cls):
        x = sprinkle(g, x, read, specials(cls), p=0.15)
    return garbage(g, cls, x, ~read)


def kl_penalty(g, cls, dtype):
    B, T = randint(g, 1, 3), randint(g, 1, 9)
    everything = torch.ones(B, T, dtype=torch.bool)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = lp + randn(g, B, T, scale=0.5)
    lp, ref = _ppo_values(g, cls, lp, everything), _ppo_values(g, cls, ref, everything)
    estimator = choice(g, ("k1", "k2", "k3", "abs", "low_var_kl"))
    clamp = choice(g, (None, (-1.0, 2.0), (None, 0.5)))
    output_clamp = choice(g, (None, (0.0, 5.0)))
    return Case({"lp": lp.to(dtype), "ref": ref.to(dtype)},
                lambda t, b: (ck.kl_penalty(t["lp"], t["ref"], estimator, clamp=clamp, output_clamp=output_clamp,
                                            backend=b),),
                diff=("lp", "ref"), grad_outputs=(0,), note=f"{estimator} clamp={clamp} out={output_clamp}")


def gae(g, cls, dtype):
    B, T = randint(g, 1, 4), randint(g, 1, 20)
    mask = response_mask(g, B, T, cls)
    read = mask != 0
    rewards = _ppo_values(g, cls, randn(g, B, T, scale=0.3), read)
    values = _ppo_values(g, cls, randn(g, B, T), read)
    gamma, lam = choice(g, (1.0, 0.99, 0.5)), choice(g, (1.0, 0.95, 0.0))
    return Case({"rewards": rewards.to(dtype), "values": values.to(dtype), "mask": mask},
                lambda t, b: ck.gae(t["rewards"], t["values"], t["mask"], gamma=gamma, lam=lam, backend=b),
                atol=1e-5 * T * finite_max(rewards[read], values[read]), note=f"gamma={gamma} lam={lam}")


def masked_whiten(g, cls, dtype):
    B, T = randint(g, 1, 4), randint(g, 1, 20)
    mask = response_mask(g, B, T, cls)
    read = mask != 0
    x = randn(g, B, T)
    if cls == "extreme":
        x = choice(g, (x * 1e20, x * 1e30, x + choice(g, (1e6, 3e7, 1e8)), x * 1e-30))
    elif specials(cls):
        x = sprinkle(g, x, read, specials(cls), p=0.15)
    x = garbage(g, cls, x, ~read)
    shift_mean, unbiased = coin(g), coin(g)
    return Case({"x": x.to(dtype), "mask": mask},
                lambda t, b: (ck.masked_whiten(t["x"], t["mask"], shift_mean=shift_mean, unbiased=unbiased, backend=b),),
                atol=1e-5 if shift_mean else 1e-5 * finite_max(x[read]), note=f"shift_mean={shift_mean}")


def ppo_advantages(g, cls, dtype):
    B, T = randint(g, 1, 4), randint(g, 1, 20)
    mask = response_mask(g, B, T, cls)
    read = mask != 0
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = lp + randn(g, B, T, scale=0.3)
    values, scores = randn(g, B, T), randn(g, B)
    if cls == "extreme":
        values, scores = values * 1e30, scores * 1e30
    elif specials(cls):
        lp, ref, values = (sprinkle(g, x, read, specials(cls), p=0.1) for x in (lp, ref, values))
    lp, ref, values = (garbage(g, cls, x, ~read) for x in (lp, ref, values))
    kl_coef, estimator, whiten = choice(g, (0.0, 0.05)), choice(g, ("k1", "k3", "low_var_kl")), coin(g, 0.7)
    # returns and raw advantages are sums of up to T rewards and values; whitened advantages are O(1)
    summed = 1e-5 * T * finite_max(values[read], scores)
    return Case({"scores": scores.to(dtype), "lp": lp.to(dtype), "ref": ref.to(dtype), "values": values.to(dtype),
                 "mask": mask},
                lambda t, b: ck.ppo_advantages(t["scores"], t["lp"], t["ref"], t["values"], t["mask"], kl_coef=kl_coef,
                                               estimator=estimator, whiten=whiten, backend=b),
                atol=(1e-5 if whiten else summed, summed, summed, 1e-5), note=f"{estimator} whiten={whiten}")


def ppo_policy_loss(g, cls, dtype):
    B, T = randint(g, 1, 4), randint(g, 1, 20)
    mask = response_mask(g, B, T, cls)
    read = mask != 0
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + randn(g, B, T, scale=0.3)
    adv = randn(g, B, T)
    if cls == "extreme":
        adv = adv * 1e30
        lp = torch.where(some(g, read, 0.3), lp * 1e30, lp)
    elif specials(cls):
        which = choice(g, ("lp", "old", "adv"))
        lp, old, adv = (sprinkle(g, x, read, specials(cls), p=0.15) if name == which else x
                        for name, x in (("lp", lp), ("old", old), ("adv", adv)))
    lp, old, adv = (garbage(g, cls, x, ~read) for x in (lp, old, adv))
    agg = choice(g, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
    dual_clip = choice(g, (None, 3.0))

    def call(t, b):
        loss, stats = ck.ppo_policy_loss(t["lp"], t["old"], t["adv"], t["mask"], clip_low=0.2, clip_high=0.28,
                                         dual_clip=dual_clip, agg=agg, backend=b)
        return (loss, stats["clipfrac"], stats["dual_clipfrac"], stats["approx_kl"], stats["approx_kl_k1"])

    return Case({"lp": lp.to(dtype), "old": old.to(dtype), "adv": adv.to(dtype), "mask": mask}, call,
                # the loss is a mean of terms up to |A| e^20 (the clamped ratio): its absolute floor scales with them
                diff=("lp",), grad_outputs=(0,),
                atol=(1e-6 * finite_max(adv[read]) * math.exp(20) if cls == "extreme" else 1e-5, 1e-5, 1e-5, 1e-5, 1e-5),
                note=f"{agg} dual={dual_clip}")


def ppo_value_loss(g, cls, dtype):
    B, T = randint(g, 1, 4), randint(g, 1, 20)
    mask = response_mask(g, B, T, cls)
    read = mask != 0
    values, old, returns = randn(g, B, T), randn(g, B, T), randn(g, B, T)
    values, old, returns = (_ppo_values(g, cls, x, read, extreme=1e18) for x in (values, old, returns))
    agg = choice(g, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
    clip = choice(g, (None, 0.2))

    def call(t, b):
        loss, clipfrac = ck.ppo_value_loss(t["values"], t["old"], t["returns"], t["mask"], clip=clip, agg=agg,
                                           backend=b)
        return loss, clipfrac

    return Case({"values": values.to(dtype), "old": old.to(dtype), "returns": returns.to(dtype), "mask": mask}, call,
                diff=("values",), grad_outputs=(0,), atol=1e-5 * (1e36 if cls == "extreme" else 1),
                note=f"{agg} clip={clip}")


BUILDERS = {f.__name__: f for f in (
    token_logprobs, linear_token_logprobs, choice_logprobs, pairwise_loss, last_token_rewards, reward_pairwise_loss,
    ranked_pairwise_loss, reward_ranked_loss, kl_penalty, gae, masked_whiten, ppo_advantages, ppo_policy_loss,
    ppo_value_loss)}
