"""Drop-in replacements for OpenRLHF's scoring, KL, GAE and reward-model losses (checked against 0.11.2).

Same names, signatures, return dtypes and semantics as OpenRLHF's (``openrlhf.models.utils``,
``openrlhf.models.loss``, ``RemoteExperienceMaker`` in ``openrlhf.trainer.ppo_utils.experience_maker``):

  log_probs_from_logits(logits, labels, temperature=1.0)
      log p(label) per position, in the logits' dtype. As OpenRLHF, temperature != 1 divides
      ``logits`` *in place* first (callers may read the scaled logits afterwards).
  compute_entropy(logits) -> entropy per position, logits' dtype.
  compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False)
      k1 / k2 / k3 in fp32, then clamped to [-10, 10]; k3's log-ratio is first clamped below at -10
      (OpenRLHF's guard against an overflowing derivative). With ``unbiased_gradient`` the value is
      kept and the gradient is that of w * k2, w = exp(log_probs - log_probs_old) clamped at 10.
  get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)
      OpenRLHF's GAE: values and rewards are *multiplied* by the mask, then the plain loop runs over
      every position (padding included, its values read as 0). Our ``gae`` skips masked positions
      and carries through them (veRL's rule), so the adapter feeds it the masked tensors with an
      all-ones mask, under which skip-and-carry is exactly the plain loop.
  get_cumulative_returns(rewards, action_mask, gamma)
      REINFORCE returns: GAE with values 0 and lambda 1 (delta_t = r_t, A_t = r_t + gamma A_{t+1}).
  PairWiseLoss / LogExpLoss: mean of -logsigmoid(chosen - reject [- margin]) / log(1 + exp(reject -
      chosen)) (LogExpLoss ignores the margin, as OpenRLHF's); ``cai_kernels.pairwise_loss``, which
      is finite where OpenRLHF's LogExpLoss overflows (reject - chosen > 88 in fp32).
  ValueLoss(clip_eps=None, token_level_loss=True): 0.5 * clipped squared error, OpenRLHF's reductions.

Dtypes are OpenRLHF's for every input dtype (see ``_common``): e.g. ``ValueLoss(token_level_loss=False)``
is fp32 for bf16 inputs (its ``token_counts + 1e-8``), a float32 ``action_mask`` makes the GAE fp32.

``apply_to_openrlhf()`` patches them into the installed package (functions in every module that
imported them, the loss classes, the two ``RemoteExperienceMaker`` methods) and returns an undo
handle. Importing this module does not import OpenRLHF. Not covered: ``PolicyLoss`` (its vLLM
importance-sampling corrections have no counterpart in ``ppo_policy_loss``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ._common import dtype_key, global_agg_scale, key_probe, result_dtype
from ._patching import PatchHandle, Target, Unsupported, apply_targets, mark_adapter, with_fallback

__all__ = ["log_probs_from_logits", "compute_entropy", "compute_approx_kl", "get_advantages_and_returns",
           "get_cumulative_returns", "PairWiseLoss", "LogExpLoss", "ValueLoss", "apply_to_openrlhf", "Unsupported"]

KL_CLAMP = (-10.0, 10.0)  # OpenRLHF clamps every estimate to this range
K3_LOG_RATIO_MIN = -10.0  # ... and k3's log-ratio from below before the exp
KL_IS_WEIGHT_CLIP = 10.0  # upper bound of the importance weight of the unbiased KL gradient


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature): (..., V), (...) -> (...) in the logits' dtype.

    Like OpenRLHF's, divides ``logits`` in place by ``temperature`` when it is not 1. One fused pass
    (``cai_kernels.token_logprobs``, math in fp32) instead of gather + chunked logsumexp; differentiable.
    """
    import cai_kernels

    if temperature != 1.0:
        logits.div_(temperature)
    return cai_kernels.token_logprobs(logits, labels.long()).to(logits.dtype)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (..., V) -> (...) in the logits' dtype, differentiable."""
    import cai_kernels

    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = cai_kernels.token_logprobs(logits, targets, return_entropy=True)
    return entropy.to(logits.dtype)


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, log_probs_old: torch.Tensor | None = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> torch.Tensor:
    """OpenRLHF's per-token KL(pi || pi_ref) estimate, fp32, clamped to [-10, 10] (see module doc)."""
    import cai_kernels

    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    clamp = (K3_LOG_RATIO_MIN, None) if kl_estimator == "k3" else None
    value = cai_kernels.kl_penalty(log_probs, log_probs_base, kl_estimator, clamp=clamp, output_clamp=KL_CLAMP)
    if not unbiased_gradient:
        return value
    # straight-through: the chosen estimator's value, the gradient of w * k2 (the true reverse-KL gradient)
    if log_probs_old is None:
        weight = 1.0
    else:
        weight = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = weight * cai_kernels.kl_penalty(log_probs, log_probs_base, "k2")
    return value.detach() + surrogate - surrogate.detach()


def _check_discount(**values) -> None:
    for name, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
            raise Unsupported(f"{name}={value}: cai_kernels.gae takes discounts in [0, 1]")


@torch.no_grad()
def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor | None,
                               gamma: float, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE (multiply-by-mask): (values, rewards) (B, T) -> (advantages, returns) (B, T).

    advantages_t = delta_t + gamma * lambd * advantages_{t+1}, delta_t = r_t + gamma * v_{t+1} - v_t
    over every position, with r and v zeroed where ``action_mask`` is 0; returns = advantages +
    masked values. Output in the inputs' promoted dtype.
    """
    import cai_kernels

    _check_discount(gamma=gamma, lambd=lambd)
    # OpenRLHF multiplies by the mask first: a float32 mask promotes bf16 values / rewards to fp32
    dtype = result_dtype(values, rewards) if action_mask is None else result_dtype(values, rewards, action_mask)
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    everywhere = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    advantages, returns = cai_kernels.gae(rewards, values, everywhere, gamma=float(gamma), lam=float(lambd))
    return advantages.to(dtype), returns.to(dtype)


@torch.no_grad()
def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns: G_t = r_t + gamma * G_{t+1} over every position, r zeroed off the mask."""
    import cai_kernels

    _check_discount(gamma=gamma)
    dtype = rewards.dtype
    if action_mask is not None:
        rewards = action_mask * rewards
    everywhere = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    zeros = torch.zeros((), dtype=rewards.dtype, device=rewards.device).expand(rewards.shape)
    returns, _ = cai_kernels.gae(rewards, zeros, everywhere, gamma=float(gamma), lam=1.0)
    return returns.to(dtype)


@functools.lru_cache(maxsize=None)
def _pairwise_dtype(chosen, reject, margin, log_exp: bool) -> torch.dtype:
    """OpenRLHF's PairWiseLoss / LogExpLoss arithmetic replayed on probes (arguments: `dtype_key`s)."""
    c, r, m = key_probe(chosen), key_probe(reject), key_probe(margin)
    if log_exp:  # log(1 + exp(reject - chosen)).mean(), the margin unused
        return torch.log(1 + torch.exp(r - c)).mean().dtype
    return (-F.logsigmoid(c - r if m is None else c - r - m)).mean().dtype


def _pairwise_mean(chosen: torch.Tensor, rejected: torch.Tensor, margin=None, log_exp: bool = False) -> torch.Tensor:
    import cai_kernels

    dtype = _pairwise_dtype(dtype_key(chosen), dtype_key(rejected), dtype_key(margin), log_exp)
    compute = result_dtype(chosen, rejected)
    loss = cai_kernels.pairwise_loss(chosen.to(compute), rejected.to(compute), margin=margin, reduction="mean")
    return loss.to(dtype)


class PairWiseLoss(nn.Module):
    """OpenRLHF's reward-model loss: mean(-logsigmoid(chosen_reward - reject_reward - margin))."""

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor,
                margin: torch.Tensor | None = None) -> torch.Tensor:
        return _pairwise_mean(chosen_reward, reject_reward, margin)


class LogExpLoss(nn.Module):
    """OpenRLHF's log(1 + exp(reject - chosen)).mean() (Anthropic's HH form); ignores ``margin``."""

    def forward(self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor,
                margin: torch.Tensor | None = None) -> torch.Tensor:
        return _pairwise_mean(chosen_reward, reject_reward, log_exp=True)


def _masked_mean(tensor: torch.Tensor, mask) -> torch.Tensor:
    return tensor.mean() if mask is None else (tensor * mask).sum() / mask.sum()


@functools.lru_cache(maxsize=None)
def _value_loss_dtype(values, old_values, returns, mask, clipped: bool, token_level: bool, batch_num_tokens,
                      global_batch_size) -> torch.dtype:
    """OpenRLHF's ValueLoss.forward + aggregate_loss arithmetic replayed on probes (arguments: `dtype_key`s)."""
    v, old, ret = (key_probe(k, dims=2) for k in (values, old_values, returns))
    mask = key_probe(mask, dims=2)
    loss = torch.max((old + (v - old).clamp(-0.2, 0.2) - ret) ** 2, (v - ret) ** 2) if clipped else (v - ret) ** 2
    if token_level:
        if batch_num_tokens is None:
            out = _masked_mean(loss, mask)
        else:
            out = (loss * mask).sum() / key_probe(batch_num_tokens, dims=0)
    else:
        mask = mask if mask is not None else torch.ones_like(loss, dtype=torch.bool)
        token_counts = mask.sum(dim=-1)
        seq_loss = (loss * mask).sum(dim=-1) / (token_counts + 1e-8)
        seq_mask = (token_counts > 0).float()
        if global_batch_size is None:
            out = _masked_mean(seq_loss, seq_mask)
        else:
            out = (seq_loss * seq_mask).sum() / key_probe(global_batch_size, dims=0)
    return (0.5 * out).dtype


class ValueLoss(nn.Module):
    """OpenRLHF's PPO value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within clip_eps of old_values.

    token_level_loss: masked token mean ("token-mean"); else the mean over sequences (with tokens)
    of each one's token mean. ``batch_num_tokens`` / ``global_batch_size`` replace the local
    counts and ``dp_size`` multiplies, as in OpenRLHF's ``aggregate_loss``. The result has
    OpenRLHF's dtype (fp32 for bf16 inputs with ``token_level_loss=False`` or a float32 mask).
    The forward reads ``self.clip_eps`` / ``self.token_level_loss``, the attributes OpenRLHF's
    ``__init__`` sets (the patched class keeps OpenRLHF's ``__init__``).
    """

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: torch.Tensor | None = None, dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> torch.Tensor:
        import cai_kernels

        if values.ndim != 2:
            raise Unsupported("values of shape (B, T) only")
        mask = action_mask if action_mask is not None else torch.ones_like(values, dtype=torch.bool)
        agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
        loss, _ = cai_kernels.ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
        denominator = batch_num_tokens if self.token_level_loss else global_batch_size
        if denominator is not None:
            loss = loss * global_agg_scale(mask, agg, denominator, dp_size)
        dtype = _value_loss_dtype(dtype_key(values), dtype_key(old_values), dtype_key(returns),
                                  dtype_key(action_mask), self.clip_eps is not None, bool(self.token_level_loss),
                                  dtype_key(batch_num_tokens), dtype_key(global_batch_size))
        return loss.to(dtype)


def _method(adapter):
    """The adapter as a method (OpenRLHF's GAE helpers are methods of RemoteExperienceMaker)."""

    def method(self, *args, **kwargs):
        return adapter(*args, **kwargs)

    method.__name__, method.__qualname__, method.__doc__ = adapter.__name__, adapter.__name__, adapter.__doc__
    return method


def _module_class(adapter_cls: type, original: type) -> type:
    """A subclass of the stack's class whose forward is ours (falling back to theirs when unsupported).

    Only ``forward`` is taken from the adapter: ``__init__`` stays OpenRLHF's (an adapter
    ``__init__`` calls ``super()`` of a class the patched one does not inherit from), and our
    forwards read the attributes it sets.
    """
    cls = type(adapter_cls.__name__, (original,), {
        "forward": with_fallback(adapter_cls.forward, original.forward),
        "__doc__": adapter_cls.__doc__, "__module__": adapter_cls.__module__})
    return mark_adapter(cls)


_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"


def _targets() -> list[Target]:
    """Everything apply_to_openrlhf replaces, with how each replacement wraps OpenRLHF's original."""
    targets = [Target("openrlhf.models.utils", fn.__name__, functools.partial(with_fallback, fn))
               for fn in (log_probs_from_logits, compute_entropy, compute_approx_kl)]
    targets += [Target("openrlhf.models.loss", cls.__name__, functools.partial(_module_class, cls))
                for cls in (PairWiseLoss, LogExpLoss, ValueLoss)]
    targets += [Target(_MAKER, f"RemoteExperienceMaker.{fn.__name__}",
                       lambda original, fn=fn: with_fallback(_method(fn), original))
                for fn in (get_advantages_and_returns, get_cumulative_returns)]
    return targets


def apply_to_openrlhf() -> PatchHandle:
    """Patch the installed OpenRLHF to compute with cai_kernels; returns an undo handle.

    Patches ``log_probs_from_logits``, ``compute_entropy``, ``compute_approx_kl`` wherever imported,
    the ``PairWiseLoss`` / ``LogExpLoss`` / ``ValueLoss`` classes (subclasses of OpenRLHF's), and
    ``RemoteExperienceMaker.get_advantages_and_returns`` / ``get_cumulative_returns`` (that module
    needs Ray and vLLM). Calls with options we do not cover run OpenRLHF's own code. What cannot be
    patched (``openrlhf.models`` imports flash-attn, DeepSpeed and PEFT; without them nothing under
    it loads) is listed in ``handle.not_patched`` and named in a `PatchWarning`.
    """
    return apply_targets("openrlhf", _targets(),
                         ["openrlhf", "openrlhf.models.utils", "openrlhf.models.loss", "openrlhf.models", _MAKER])
