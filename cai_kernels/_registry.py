"""Every op and where each of its implementations lives; picks a backend per call.

Backends:
  reference  plain PyTorch (``cai_kernels/reference``): ground truth for tests, baseline for
             benchmarks, and the fallback wherever nothing compiled is present.
  cpu        the C++ kernels (``csrc/cpu``, SIMD + OpenMP), registered as torch.ops.cai_kernels_cpu.
  triton     the Triton kernels (``cai_kernels/triton``): CUDA tensors, or CPU tensors through the
             interpreter (TRITON_INTERPRET=1).

Choice, per call: ``backend=`` if given, else the env var CAI_KERNELS_BACKEND, else "auto" (the
compiled backend for the tensors' device, or the reference with a one-time warning). A backend that
is asked for by name but cannot run on those tensors is an error, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _extension
from . import triton as _triton

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "CAI_KERNELS_BACKEND"


@dataclass(frozen=True)
class Op:
    """Where the implementations of one public op live (``module:function`` or C++ op names)."""

    name: str
    reference: str
    cpu: tuple[str, ...]     # kernels in torch.ops.cai_kernels_cpu (csrc/cpu/*.cpp)
    triton: str              # module holding the Triton kernels and their launchers


OPS: dict[str, Op] = {op.name: op for op in (
    # Family 1: log-prob scoring
    Op("token_logprobs", "cai_kernels.reference.logprobs:token_logprobs",
       ("token_logprobs_fwd", "token_logprobs_bwd"), "cai_kernels.triton.logprobs"),
    Op("linear_token_logprobs", "cai_kernels.reference.logprobs:linear_token_logprobs",
       ("linear_token_logprobs_fwd", "linear_token_logprobs_bwd"), "cai_kernels.triton.linear_logprobs"),
    Op("choice_logprobs", "cai_kernels.reference.logprobs:choice_logprobs",
       ("token_logprobs_fwd", "token_logprobs_bwd", "linear_token_logprobs_fwd", "linear_token_logprobs_bwd",
        "option_scores"), "cai_kernels.triton.choice"),
    # Family 2: preference-model losses
    Op("pairwise_loss", "cai_kernels.reference.pairwise:pairwise_loss",
       ("pairwise_loss_fwd", "pairwise_loss_bwd"), "cai_kernels.triton.pairwise"),
    Op("last_token_rewards", "cai_kernels.reference.pairwise:last_token_rewards",
       ("last_token_rewards_fwd", "last_token_rewards_bwd"), "cai_kernels.triton.pairwise"),
    Op("reward_pairwise_loss", "cai_kernels.reference.pairwise:reward_pairwise_loss",
       ("last_token_rewards_fwd", "last_token_rewards_bwd", "pairwise_loss_fwd", "pairwise_loss_bwd"),
       "cai_kernels.triton.pairwise"),
    Op("ranked_pairwise_loss", "cai_kernels.reference.pairwise:ranked_pairwise_loss",
       ("ranked_pairwise_loss_fwd", "ranked_pairwise_loss_bwd"), "cai_kernels.triton.pairwise"),
    Op("reward_ranked_loss", "cai_kernels.reference.pairwise:reward_ranked_loss",
       ("last_token_rewards_fwd", "last_token_rewards_bwd", "ranked_pairwise_loss_fwd", "ranked_pairwise_loss_bwd"),
       "cai_kernels.triton.pairwise"),
    # Family 3: PPO advantages, KL and clipped losses
    Op("kl_penalty", "cai_kernels.reference.ppo:kl_penalty",
       ("kl_penalty_fwd", "kl_penalty_bwd"), "cai_kernels.triton.ppo"),
    Op("gae", "cai_kernels.reference.ppo:gae", ("gae_fwd",), "cai_kernels.triton.ppo"),
    Op("masked_whiten", "cai_kernels.reference.ppo:masked_whiten", ("masked_whiten_fwd",), "cai_kernels.triton.ppo"),
    Op("ppo_advantages", "cai_kernels.reference.ppo:ppo_advantages", ("ppo_advantages_fwd",),
       "cai_kernels.triton.ppo"),
    Op("ppo_policy_loss", "cai_kernels.reference.ppo:ppo_policy_loss",
       ("ppo_policy_loss_fwd", "ppo_policy_loss_bwd"), "cai_kernels.triton.ppo"),
    Op("ppo_value_loss", "cai_kernels.reference.ppo:ppo_value_loss",
       ("ppo_value_loss_fwd", "ppo_value_loss_bwd"), "cai_kernels.triton.ppo"),
)}


def _live(op: Op, backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the C++ kernels run on CPU tensors, not {device_type}"
        ext = _extension.status()
        if not ext.loaded:
            return False, ext.reason
        missing = [name for name in op.cpu if not hasattr(torch.ops.cai_kernels_cpu, name)]
        if missing:
            return False, f"the loaded extension lacks {missing} (rebuild it)"
        return True, ext.reason
    return _triton.available_for(device_type)


def status(op_name: str, device_type: str) -> dict[str, tuple[bool, str]]:
    """For each backend: can it run ``op_name`` on tensors of ``device_type``, and why (not)."""
    op = OPS[op_name]
    return {backend: _live(op, backend, device_type) for backend in BACKENDS}


# Evaluated once while torch.compile traces (its result, a string, becomes a constant of the graph)
# rather than traced through: it reads the environment and imports modules.
@torch.compiler.assume_constant_result
def select_backend(op_name: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op_name`` on tensors on ``device`` (see module docstring)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}; got {requested!r}")
    op = OPS[op_name]
    if requested != "auto":
        ok, why = _live(op, requested, device.type)
        if not ok:
            raise ValueError(f"backend {requested!r} cannot run {op_name} on {device.type} tensors: {why}")
        return requested
    compiled = "cpu" if device.type == "cpu" else "triton"
    ok, why = _live(op, compiled, device.type)
    if ok:
        return compiled
    _extension.warn_fallback_once(device.type, why)
    return "reference"
