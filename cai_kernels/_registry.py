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

import functools
import importlib
import os
from dataclasses import dataclass

import torch

from . import _extension
from . import triton as _triton

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "CAI_KERNELS_BACKEND"


@dataclass(frozen=True)
class Op:
    """One public op and where its implementations live. Every layer uses the op's name:
    ``cai_kernels/ops/<name>.py`` (the public function, its custom ops and autograd),
    ``cai_kernels/reference/<name>.py`` (the function ``<name>``), ``cai_kernels/triton/<name>.py`` (its
    Triton kernels and launchers), ``csrc/cpu/<name>.cpp`` (its C++ kernels), ``tests/test_<name>.py``
    and ``benchmarks/test_bench_<name>.py``. A composite op (``parts``) runs its parts' kernels and has
    none of its own."""

    name: str
    cpu: tuple[str, ...] = ()    # its kernels in torch.ops.cai_kernels_cpu (registered by csrc/cpu/<name>.cpp)
    triton: bool = True          # whether cai_kernels/triton/<name>.py exists
    parts: tuple[str, ...] = ()  # ops whose kernels it runs too

    @property
    def ops_module(self) -> str:
        return f"cai_kernels.ops.{self.name}"

    @property
    def reference_module(self) -> str:
        return f"cai_kernels.reference.{self.name}"

    @property
    def triton_module(self) -> str | None:
        return f"cai_kernels.triton.{self.name}" if self.triton else None


OPS: dict[str, Op] = {op.name: op for op in (
    # log-prob scoring
    Op("token_logprobs", cpu=("token_logprobs_fwd", "token_logprobs_bwd")),
    Op("linear_token_logprobs", cpu=("linear_token_logprobs_fwd", "linear_token_logprobs_bwd")),
    Op("choice_logprobs", cpu=("option_scores",), parts=("token_logprobs", "linear_token_logprobs")),
    # preference-model losses
    Op("pairwise_loss", cpu=("pairwise_loss_fwd", "pairwise_loss_bwd")),
    Op("last_token_rewards", cpu=("last_token_rewards_fwd", "last_token_rewards_bwd")),
    Op("reward_pairwise_loss", triton=False, parts=("last_token_rewards", "pairwise_loss")),
    Op("ranked_pairwise_loss", cpu=("ranked_pairwise_loss_fwd", "ranked_pairwise_loss_bwd")),
    Op("reward_ranked_loss", triton=False, parts=("last_token_rewards", "ranked_pairwise_loss")),
    # PPO: KL, advantages, clipped losses
    Op("kl_penalty", cpu=("kl_penalty_fwd", "kl_penalty_bwd")),
    Op("gae", cpu=("gae_fwd",)),
    Op("masked_whiten", cpu=("masked_whiten_fwd",)),
    Op("ppo_advantages", cpu=("ppo_advantages_fwd",)),
    Op("ppo_policy_loss", cpu=("ppo_policy_loss_fwd", "ppo_policy_loss_bwd")),
    Op("ppo_value_loss", cpu=("ppo_value_loss_fwd", "ppo_value_loss_bwd")),
)}


def cpu_kernel_names(op: Op) -> tuple[str, ...]:
    """The C++ kernels ``op`` runs: its own and its parts'."""
    return op.cpu + tuple(name for part in op.parts for name in cpu_kernel_names(OPS[part]))


_KERNELS: dict[tuple[str, str], object] = {}


def kernels(op_name: str, backend: str):
    """What holds ``op_name``'s compiled kernels for ``backend``: the C++ kernels (``torch.ops.cai_kernels_cpu``
    behind ``_extension.cpu_kernels``) for "cpu", the module ``cai_kernels/triton/<op_name>.py`` for
    "triton". Both take the same arguments: tensors first, then the op's parameter bundle."""
    found = _KERNELS.get((op_name, backend))
    if found is None:
        if backend == "cpu":
            found = _extension.cpu_kernels
        elif backend == "triton":
            found = importlib.import_module(OPS[op_name].triton_module)
        else:
            raise ValueError(f"{op_name} has no compiled kernels for backend {backend!r}")
        _KERNELS[(op_name, backend)] = found
    return found


@functools.cache
def _cpu_live(op_name: str) -> tuple[bool, str]:
    ext = _extension.status()
    if not ext.loaded:
        return False, ext.reason
    missing = [name for name in cpu_kernel_names(OPS[op_name]) if not hasattr(torch.ops.cai_kernels_cpu, name)]
    if missing:
        return False, f"the loaded extension lacks {missing} (rebuild it)"
    return True, ext.reason


def _live(op: Op, backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the C++ kernels run on CPU tensors, not {device_type}"
        return _cpu_live(op.name)
    return _triton.available_for(device_type)


def status(op_name: str, device_type: str) -> dict[str, tuple[bool, str]]:
    """For each backend: can it run ``op_name`` on tensors of ``device_type``, and why (not)."""
    op = OPS[op_name]
    return {backend: _live(op, backend, device_type) for backend in BACKENDS}


_SELECTED: dict[tuple, str] = {}

# os.environ.get costs ~0.5 us (~1.3 us for a missing variable: a KeyError inside); the mapping behind
# os.environ (bytes keys on POSIX, what os.environ[...] = / del update) answers the same in ~0.1 us.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR), os.environ.encodekey("TRITON_INTERPRET")
except AttributeError:  # not CPython's os.environ: read it the ordinary way
    _ENV_DATA = None


def _env(i: int, name: str):
    """os.environ.get(name) as a raw value (bytes on POSIX: compared and hashed only, never shown)."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_ENV_KEY[i])
    return os.environ.get(name)


# Evaluated once while torch.compile traces (its result, a string, becomes a constant of the graph)
# rather than traced through: it reads the environment and imports modules.
@torch.compiler.assume_constant_result
def select_backend(op_name: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op_name`` on tensors on ``device`` (see module docstring). Cached per
    (op, device type, backend=, CAI_KERNELS_BACKEND, and on CPU TRITON_INTERPRET): a call costs a dict lookup."""
    device_type = device.type
    env = _env(0, ENV_VAR) if backend is None else None
    key = (op_name, device_type, backend, env, _env(1, "TRITON_INTERPRET") if device_type == "cpu" else None)
    found = _SELECTED.get(key)
    if found is None:
        found = _SELECTED[key] = _select(op_name, device_type, backend, os.environ.get(ENV_VAR) if backend is None
                                         else None)
    return found


def _select(op_name: str, device_type: str, backend: str | None, env: str | None) -> str:
    requested = backend if backend is not None else (env or "auto")
    if requested not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}; got {requested!r}")
    op = OPS[op_name]
    if requested != "auto":
        ok, why = _live(op, requested, device_type)
        if not ok:
            raise ValueError(f"backend {requested!r} cannot run {op_name} on {device_type} tensors: {why}")
        return requested
    compiled = "cpu" if device_type == "cpu" else "triton"
    ok, why = _live(op, compiled, device_type)
    if ok:
        return compiled
    _extension.warn_fallback_once(device_type, why)
    return "reference"
