"""What users would run instead of cai_kernels: the peers' own code where it installs, else re-expressed.

Every peer is imported lazily (a missing package must not break the suite) and returns either a
callable or the reason it is unavailable here, which the benchmark reports as a skip.

Re-expressed peers follow the source of the named project line for line in what they compute and in
how (the Python loops are the point: they are what those stacks run when no fused kernel is present);
each docstring names the original.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F


def _import(module: str, attr: str):
    """(object, None) or (None, why)."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as error:  # noqa: BLE001 - ImportError, or a package broken against this torch
        return None, f"{module}.{attr} is not importable here ({type(error).__name__}: {str(error)[:120]})"


def _needs_cuda(name: str) -> str | None:
    return None if torch.cuda.is_available() else f"{name} runs on CUDA only (no GPU on this machine)"


# -- per-token log-probs ------------------------------------------------------------------------------

@functools.cache
def trl_selective_log_softmax():
    """TRL's ``trl.trainer.utils.selective_log_softmax`` (installed with ``pip install --no-deps trl``).

    On CPU it loops over the first dimension (the batch of a (B, T, V) tensor): a logsumexp per row for
    fp32, a full log_softmax per row for bf16. On CUDA, TRL >= 1.x dispatches to its own Triton kernel.
    """
    return _import("trl.trainer.utils", "selective_log_softmax")


def verl_rowloop_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """veRL's ``logprobs_from_logits_v2`` (verl/utils/torch_functional.py), used when flash-attn's
    cross-entropy is absent, on the padding-free (total_tokens, V) logits veRL's actors pass it.
    OpenRLHF's ``log_probs_from_logits`` runs the same per-row loop for bf16 logits.

    fp32: gather the target logit, logsumexp one row at a time. bf16: log_softmax (in bf16) one row at
    a time, then gather. Re-expressed: veRL pulls in ray, vllm and flash-attn.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # "loop to reduce peak mem consumption"
        rows.append(F.log_softmax(row_logits, dim=-1).gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def liger_cross_entropy():
    """Liger-Kernel's Triton cross-entropy, per token (reduction="none"): -log p(target)."""
    why = _needs_cuda("Liger-Kernel")
    if why:
        return None, why
    fn, why = _import("liger_kernel.transformers.functional", "liger_cross_entropy")
    if fn is None:
        return None, why

    def logprobs(logits, targets):
        out = fn(logits, targets, reduction="none")
        return -_first(out)
    return logprobs, None


def flash_attn_cross_entropy():
    """flash-attn's Triton cross-entropy (``flash_attn.ops.triton.cross_entropy``), what OpenRLHF and
    veRL call first when it is installed: per-token losses, -log p(target)."""
    why = _needs_cuda("flash-attn")
    if why:
        return None, why
    fn, why = _import("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")
    if fn is None:
        return None, why
    return (lambda logits, targets: -fn(logits, targets)[0]), None


# -- LM head + log-probs --------------------------------------------------------------------------------

def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy (chunked LM head + CE, never the full logits).
    reduction="sum" (its reduction="none" has no backward): the sum of -log p(target)."""
    why = _needs_cuda("Liger-Kernel")
    if why:
        return None, why
    fn, why = _import("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")
    if fn is None:
        return None, why

    def neg_logprob_sum(hidden, weight, targets):
        return _first(fn(hidden, weight, targets, reduction="sum"))
    return neg_logprob_sum, None


def cut_cross_entropy():
    """Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``): LM head + CE in Triton
    without materializing the logits. reduction="sum": the sum of -log p(target)."""
    why = _needs_cuda("cut-cross-entropy")
    if why:
        return None, why
    fn, why = _import("cut_cross_entropy", "linear_cross_entropy")
    if fn is None:
        return None, why

    def neg_logprob_sum(hidden, weight, targets):
        return fn(hidden, weight, targets, reduction="sum")
    return neg_logprob_sum, None


def _first(out):
    """Liger's functional API returns a tensor, a tuple, or a CrossEntropyOutput depending on version."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.loss


# -- PPO --------------------------------------------------------------------------------------------------

def python_gae_loop(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                    gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as OpenRLHF (``Experience maker: get_advantages_and_returns``) and veRL
    (``core_algos.compute_gae_advantage_return``) write it: a Python loop over T in reverse, one
    (B,)-vector step per token, then a stack. Masked positions are zeroed first (OpenRLHF).
    Re-expressed: both packages pull in ray, deepspeed / vllm.
    """
    with torch.no_grad():
        values = values * response_mask
        rewards = rewards * response_mask
        lastgaelam = 0
        advantages_reversed = []
        length = rewards.size(1)
        for t in reversed(range(length)):
            nextvalues = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        return advantages, advantages + values
