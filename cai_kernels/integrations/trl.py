"""Drop-in replacements for TRL's log-prob helpers, computed with cai_kernels (checked against TRL 1.16).

Same names, signatures, return dtypes and semantics as in ``trl.trainer.utils`` / ``trl.kernels``:

  selective_log_softmax(logits, index, temperature=1.0, row_mask=None)
      log_softmax(logits / T) gathered at ``index``; index (...) or (..., K) (top-K form); rows where
      ``row_mask == 0`` give 0. Returns the logits' dtype (TRL's contract), computed in fp32.
  entropy_from_logits(logits, chunk_size=128) -> (...) entropy in the logits' dtype.
  selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None)
  ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
                               final_logit_softcapping=None, logit_scale=1.0, outputs=...)
      what TRL's fused LM head (``add_fused_lm_head``, used by its DPO / GRPO / RLOO trainers) calls:
      per-token log-probs of ``hidden @ weight.T (+ bias)`` without the logits, here
      ``cai_kernels.linear_token_logprobs``.

``apply_to_trl()`` patches these into the installed TRL, in every module that imported them, and
returns an undo handle (a context manager with ``.undo()``). Importing this module does not import TRL.

Where TRL has options our ops lack, the adapter raises `Unsupported` and, when patched, TRL's own
code runs for that call: ``final_logit_softcapping`` (Gemma 2) and a non-positive ``logit_scale``.
The fused head's metric-only outputs ``is_top1`` and ``log_sum_sq_probs`` (no gradient; DPO asks
for ``is_top1``) need the max / sum of squared probabilities over the vocabulary, which
``linear_token_logprobs`` does not return: they are computed in one extra no-grad pass over the
vocabulary in chunks (the log-probs, entropy and their gradients still come from our kernel);
``mean_logits`` is linear in hidden, so it is exact and cheap (``hidden @ weight.mean(0)``).
"""

from __future__ import annotations

import math

import torch

from ._patching import PatchHandle, Unsupported, import_modules, mark_adapter, patch_package, with_fallback

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
           "ChunkedLogProbFunction", "apply_to_trl", "Unsupported"]

# an index value that never occurs in a vocabulary: masked rows are skipped by the kernel
_SKIP = -(2 ** 62)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:  # TRL's check and message
        raise ValueError("temperature must be positive")


def _token_logprobs(logits, index, temperature, row_mask=None, with_entropy=False):
    """fp32 log-probs at ``index`` (...) (+ entropy); rows with row_mask == 0 are skipped (0)."""
    import cai_kernels

    index = index.long()
    ignore = None
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, _SKIP)
        ignore = _SKIP
    return cai_kernels.token_logprobs(logits, index, temperature=temperature, ignore_index=ignore,
                                      return_entropy=with_entropy)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at ``index``.

    Args:
        logits: (..., V) fp32 / bf16 / fp16 / fp64, any strides.
        index: (...) int32 / int64, one token per row; or (..., K) for K tokens per row (top-K form).
        temperature: > 0.
        row_mask: like ``index``; entries equal to 0 give log-probability 0 (and no gradient).
    Returns:
        The log-probs, shaped like ``index``, in the logits' dtype (math in fp32: one kernel pass
        over the logits, never a [rows, V] log-softmax tensor). Differentiable w.r.t. ``logits``.
    The top-K form makes one kernel call for the first column and reads the log-sum-exp off it:
    log p_k = z_k / T - lse with lse = z_0 / T - log p_0, so the gradient is still (1[k] - p) / T.
    """
    _check_temperature(temperature)
    if index.ndim == logits.ndim - 1:
        return _token_logprobs(logits, index, temperature, row_mask).to(logits.dtype)
    first = _token_logprobs(logits, index[..., 0], temperature)  # fp32
    scaled = torch.gather(logits, -1, index.long()).float() / temperature
    log_z = scaled[..., 0] - first
    logps = scaled - log_z.unsqueeze(-1)
    if row_mask is not None:
        logps = logps.masked_fill(row_mask == 0, 0.0)
    return logps.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: Shannon entropy (nats) of softmax(logits) per row.

    logits (..., V) -> (...) in the logits' dtype, computed in fp32 in one pass (``chunk_size`` is
    accepted for compatibility; the kernel never holds more than a row block anyway).
    Differentiable w.r.t. ``logits``.
    """
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _token_logprobs(logits, targets, 1.0, with_entropy=True)
    return entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: both from one pass over the logits.

    index (...) only (one token per row), as in TRL. Returns (log-probs, entropy) in the logits'
    dtype; rows with ``row_mask == 0`` give 0 for both. ``entropy_requires_grad=False`` detaches
    the entropy (no gradient flows through it).
    """
    _check_temperature(temperature)
    logps, entropy = _token_logprobs(logits, index, temperature, row_mask, with_entropy=True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logps.to(logits.dtype), entropy.to(logits.dtype)


_METRIC_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_KNOWN_OUTPUTS = ("log_probs", "entropy") + _METRIC_OUTPUTS
_METRIC_ROWS = 256  # tokens per chunk of the no-grad metrics pass: a [256, V] fp32 block


@torch.no_grad()
def _vocab_metrics(hidden, weight, bias, targets, inv_t, outputs):
    """is_top1 / log_sum_sq_probs / mean_logits of z = (hidden @ weight.T + bias) * inv_t, no grad.

    mean_logits is linear in hidden (exact, no vocabulary pass); the other two need the max /
    sum of squared probabilities: one pass over token chunks, the logits of a chunk in fp32.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    mean_logits = log_sum_sq = is_top1 = None
    if "mean_logits" in outputs:
        mean_w = weight.float().mean(0)
        mean_logits = (hidden.float() @ mean_w + (bias.float().mean() if bias is not None else 0.0)) * inv_t
    if "is_top1" in outputs or "log_sum_sq_probs" in outputs:
        target_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_max = torch.full((n,), -math.inf, dtype=torch.float32, device=hidden.device)
        before = torch.full((n,), -math.inf, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_sq = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, _METRIC_ROWS):
            rows = slice(start, min(start + _METRIC_ROWS, n))
            z = (hidden[rows] @ weight.t()).float()  # in the compute dtype, then fp32 (as TRL's tiles)
            if bias is not None:
                z += bias.float()
            z *= inv_t
            t = targets[rows]
            target_z[rows] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            row_max[rows] = z.amax(-1)
            # argmax takes the first maximum: a tie with an earlier token is not a top-1 hit (as TRL)
            earlier = torch.arange(vocab, device=z.device) < t.unsqueeze(-1)
            before[rows] = z.masked_fill(~earlier, -math.inf).amax(-1)
            log_z[rows] = torch.logsumexp(z, -1)
            log_sq[rows] = torch.logsumexp(2 * z, -1)
        if "is_top1" in outputs:
            is_top1 = (target_z >= row_max) & (target_z > before)
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = log_sq - 2 * log_z
    return log_sum_sq, mean_logits, is_top1


class ChunkedLogProbFunction:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction``: ``.apply`` has its signature and outputs.

    apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N] int64, temperature, chunk_size,
          final_logit_softcapping=None, logit_scale=1.0, outputs=("entropy", ...))
    -> (log_probs [N] fp32, entropy [N] fp32 | None, log_sum_sq_probs | None, mean_logits | None,
        is_top1 [N] bool | None), the logits being ``(hidden @ weight.T + bias) * logit_scale / T``.
    log_probs and entropy come from ``cai_kernels.linear_token_logprobs`` (differentiable w.r.t.
    hidden, weight, bias; the logits are never formed); the metric outputs carry no gradient.
    Under autocast, hidden / weight / bias are cast to the autocast dtype first (as TRL does).
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        import cai_kernels

        if final_logit_softcapping is not None:
            raise Unsupported("final_logit_softcapping: cai_kernels.linear_token_logprobs has no tanh soft-cap")
        if not logit_scale > 0:
            raise Unsupported(f"logit_scale={logit_scale}: only a positive scale folds into the temperature")
        unknown = set(outputs) - set(_KNOWN_OUTPUTS)
        if unknown:
            raise Unsupported(f"outputs {sorted(unknown)}")
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        # (z * scale) / T == z / (T / scale): the scale folds into the temperature
        effective_t = temperature / logit_scale
        want_entropy = "entropy" in outputs
        result = cai_kernels.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=effective_t,
                                                   return_entropy=want_entropy)
        log_probs, entropy = result if want_entropy else (result, None)
        extras = _vocab_metrics(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                                1.0 / effective_t, outputs)
        return (log_probs, entropy) + extras


def _adapters():
    """(module that defines it, name, adapter) for every TRL name we replace."""
    return [
        ("trl.trainer.utils", "selective_log_softmax", selective_log_softmax),
        ("trl.trainer.utils", "entropy_from_logits", entropy_from_logits),
        ("trl.trainer.utils", "selective_log_softmax_and_entropy", selective_log_softmax_and_entropy),
        ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", ChunkedLogProbFunction),
    ]


def apply_to_trl() -> PatchHandle:
    """Patch the installed TRL to compute log-probs / entropy (incl. its fused LM head) with cai_kernels.

    Every loaded ``trl`` module that holds one of the names gets the adapter (``trl.trainer.utils``,
    ``trl.kernels``, trainers that imported them); modules imported later pick it up from the
    patched defining module. Returns a handle: ``with apply_to_trl(): ...`` or ``h = apply_to_trl();
    h.undo()``. Calls with options we do not cover run TRL's own code.
    """
    import sys

    import_modules(["trl.trainer.utils", "trl.kernels", "trl.kernels.chunked_logprob"])
    replacements = []
    for module_name, name, adapter in _adapters():
        module = sys.modules.get(module_name)
        original = getattr(module, name, None) if module is not None else None
        if original is None:
            continue
        if isinstance(adapter, type):
            new = type(adapter.__name__, (adapter,), {"_original": original})
            new.apply = staticmethod(with_fallback(adapter.apply, original.apply))
            mark_adapter(new)
        else:
            new = with_fallback(adapter, original)
        replacements.append((original, new))
    return patch_package("trl", replacements)
