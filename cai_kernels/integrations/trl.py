"""Drop-in replacements for TRL's log-prob helpers, computed with cai_kernels (checked against TRL 1.16).

Same names, signatures, return dtypes and semantics as in ``trl.trainer.utils`` / ``trl.kernels``:

  selective_log_softmax(logits, index, temperature=1.0, row_mask=None)
      log_softmax(logits / T) gathered at ``index``; index (...) or (..., K) (top-K form); rows where
      ``row_mask == 0`` give 0. Computed in fp32; returned in TRL's dtype (see below).
  entropy_from_logits(logits, chunk_size=128) -> (...) entropy, TRL's dtype.
  selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None)
  kernel_selective_log_softmax_and_entropy(logits, index, temperature=1.0, row_mask=None)
      ``trl.kernels.selective_log_softmax_and_entropy`` (TRL's Triton kernel, also what the three
      functions above call on a GPU): (log-probs, entropy), always fp32.
  ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
                               final_logit_softcapping=None, logit_scale=1.0, outputs=...)
      what TRL's fused LM head (``add_fused_lm_head``, used by its DPO / GRPO / RLOO trainers) calls:
      per-token log-probs of ``hidden @ weight.T (+ bias)`` without the logits, here
      ``cai_kernels.linear_token_logprobs``.

``apply_to_trl()`` patches these into the installed TRL, in every module that imported them (incl.
``trl.kernels``, ``trl.kernels.logprob_entropy`` and ``trl.trainer.utils._fused_logprob_entropy``),
and returns an undo handle (a context manager with ``.undo()``). Importing this module does not import TRL.

Dtypes: TRL's. Its ``trainer.utils`` functions return the logits' dtype on the CPU path, and fp32
where they take its fused Triton kernel (CUDA / XPU logits, Triton installed, 1-3 dims, unit last
stride, one index per row): `_trl_fused_path` is that rule, checked against TRL's own.

Accuracy contract (fp16 / bf16 logits): our result is the fp32 kernel's value rounded once to the
output dtype, i.e. within 0.5 ulp (of that dtype) of the exact log-prob / entropy. TRL's CPU path
rounds inside ``log_softmax`` (up to ~1 ulp off for log-probs) and sums the entropy in the logits'
dtype (up to ~3.4 ulp off), so about 20 % of bf16 log-probs and 75 % of bf16 entropies differ from
TRL's by 1-3 ulp, always in the direction of the exact value. TRL's own tests that assert
bit-equality with ``torch.log_softmax`` in half precision fail with the patch (README, "Adapters").
fp32 / fp64 agree with TRL to rounding (1e-6 relative).

Where TRL has options our ops lack, the adapter raises `Unsupported` and, when patched, TRL's own
code runs for that call: ``final_logit_softcapping`` (Gemma 2) and a non-positive ``logit_scale``.
The fused head's metric-only outputs ``is_top1`` and ``log_sum_sq_probs`` (no gradient; DPO asks
for ``is_top1``) need the max / sum of squared probabilities over the vocabulary, which
``linear_token_logprobs`` does not return: they are computed in one extra no-grad pass over the
vocabulary in chunks (the log-probs, entropy and their gradients still come from our kernel);
``mean_logits`` is linear in hidden, so it is exact and cheap (``hidden @ weight.mean(0)``).
"""

from __future__ import annotations

import functools
import math

import torch

from ._patching import PatchHandle, Target, Unsupported, apply_targets, mark_adapter, with_fallback

__all__ = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
           "kernel_selective_log_softmax_and_entropy", "ChunkedLogProbFunction", "apply_to_trl", "Unsupported"]

# an index value that never occurs in a vocabulary: masked rows are skipped by the kernel
_SKIP = -(2 ** 62)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:  # TRL's check and message
        raise ValueError("temperature must be positive")


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    from transformers.utils import is_triton_available  # what TRL asks

    return bool(is_triton_available())


def _trl_fused_path(logits, index=None, row_mask=None) -> bool:
    """Whether TRL's ``trainer.utils`` would call its fused Triton kernel (fp32 outputs) for these inputs.

    TRL 1.16's ``is_triton_available() and _supports_trl_loss_kernel(logits, index, row_mask)``;
    tests/test_integrations_trl.py checks it against TRL's own function.
    """
    supported = (logits.device.type in ("cuda", "xpu")
                 and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and 1 <= logits.ndim <= 3 and logits.stride(-1) == 1 and logits.shape[-1] > 0)
    if supported and index is not None:
        supported = (tuple(index.shape) == tuple(logits.shape[:-1]) and index.dtype in (torch.int32, torch.int64)
                     and index.device == logits.device)
    if supported and row_mask is not None:
        supported = (index is not None and tuple(row_mask.shape) == tuple(index.shape)
                     and row_mask.dtype in (torch.bool, torch.int32, torch.int64) and row_mask.device == logits.device)
    return supported and _triton_available()


def _out_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    return torch.float32 if _trl_fused_path(logits, index, row_mask) else logits.dtype


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
        The log-probs, shaped like ``index``, in TRL's dtype: the logits' (fp32 where TRL would take
        its fused GPU kernel). Math in fp32: one kernel pass over the logits, never a [rows, V]
        log-softmax tensor. Differentiable w.r.t. ``logits``.
    The top-K form makes one kernel call for the first column and reads the log-sum-exp off it:
    log p_k = z_k / T - lse with lse = z_0 / T - log p_0, so the gradient is still (1[k] - p) / T.
    """
    _check_temperature(temperature)
    if index.ndim == logits.ndim - 1:
        return _token_logprobs(logits, index, temperature, row_mask).to(_out_dtype(logits, index, row_mask))
    first = _token_logprobs(logits, index[..., 0], temperature)  # fp32
    scaled = torch.gather(logits, -1, index.long()).float() / temperature
    log_z = scaled[..., 0] - first
    logps = scaled - log_z.unsqueeze(-1)
    if row_mask is not None:
        logps = logps.masked_fill(row_mask == 0, 0.0)
    return logps.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: Shannon entropy (nats) of softmax(logits) per row.

    logits (..., V) -> (...) in TRL's dtype (as selective_log_softmax), computed in fp32 in one pass (``chunk_size`` is
    accepted for compatibility; the kernel never holds more than a row block anyway).
    Differentiable w.r.t. ``logits``.
    """
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _token_logprobs(logits, targets, 1.0, with_entropy=True)
    return entropy.to(_out_dtype(logits))


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: both from one pass over the logits.

    index (...) only (one token per row), as in TRL. Returns (log-probs, entropy) in TRL's dtype
    (as selective_log_softmax); rows with ``row_mask == 0`` give 0 for both.
    ``entropy_requires_grad=False`` detaches the entropy (no gradient flows through it).
    """
    _check_temperature(temperature)
    logps, entropy = _token_logprobs(logits, index, temperature, row_mask, with_entropy=True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    dtype = _out_dtype(logits, index, row_mask)
    return logps.to(dtype), entropy.to(dtype)


def kernel_selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                                             row_mask: torch.Tensor | None = None
                                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``trl.kernels.selective_log_softmax_and_entropy``: TRL's fused kernel, on ``cai_kernels.token_logprobs``.

    Args:
        logits: (..., V) fp32 / bf16 / fp16, any strides (TRL's kernel: 1-3 dims, CUDA).
        index: (...) int32 / int64, one token per row.
        temperature: > 0.
        row_mask: like ``index`` (bool / int); rows where it is 0 give 0 for both outputs and no gradient.
    Returns:
        (log-probs, entropy), shaped like ``index``, fp32 (as TRL's kernel, whatever the logits' dtype).
        Both differentiable w.r.t. ``logits``.
    """
    _check_temperature(temperature)
    return _token_logprobs(logits, index, temperature, row_mask, with_entropy=True)


# the name TRL's callers know it by (it is patched in as trl.kernels.selective_log_softmax_and_entropy)
kernel_selective_log_softmax_and_entropy.__name__ = "selective_log_softmax_and_entropy"


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


def _chunked_class(original):
    new = type(ChunkedLogProbFunction.__name__, (ChunkedLogProbFunction,), {"_original": original})
    new.apply = staticmethod(with_fallback(ChunkedLogProbFunction.apply, original.apply))
    return mark_adapter(new)


def _targets() -> list[Target]:
    """Everything apply_to_trl replaces; importers (``trl.kernels``, trainers, ``_fused_logprob_entropy``)
    follow by identity."""
    wrap = functools.partial(functools.partial, with_fallback)
    targets = [Target("trl.trainer.utils", fn.__name__, wrap(fn))
               for fn in (selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy)]
    targets.append(Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", _chunked_class))
    if _triton_available():  # TRL defines its fused log-prob / entropy kernel only then
        targets.append(Target("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy",
                              wrap(kernel_selective_log_softmax_and_entropy)))
    return targets


def apply_to_trl() -> PatchHandle:
    """Patch the installed TRL to compute log-probs / entropy (incl. its fused LM head) with cai_kernels.

    Every loaded ``trl`` module that holds one of the names gets the adapter (``trl.trainer.utils``,
    ``trl.kernels``, ``trl.kernels.logprob_entropy``, trainers that imported them); modules imported
    later pick it up from the patched defining module. Returns a handle: ``with apply_to_trl(): ...``
    or ``h = apply_to_trl(); h.undo()``. Calls with options we do not cover run TRL's own code; what
    cannot be patched is listed in ``handle.not_patched`` and named in a `PatchWarning`.
    """
    names = ["trl", "trl.trainer.utils", "trl.kernels", "trl.kernels.chunked_logprob"]
    targets = _targets()
    if any(t.module == "trl.kernels.logprob_entropy" for t in targets):
        names.append("trl.kernels.logprob_entropy")
    return apply_targets("trl", targets, names)
