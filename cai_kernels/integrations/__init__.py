"""Drop-in adapters for RLHF stacks: the stacks' own function names and semantics, computed with cai_kernels.

    cai_kernels.integrations.trl       selective_log_softmax, entropy_from_logits, the fused LM head
    cai_kernels.integrations.openrlhf  log_probs_from_logits, compute_approx_kl, GAE, PairWiseLoss, ...
    cai_kernels.integrations.verl      logprobs_from_logits, kl_penalty, compute_gae_advantage_return, ...

Each ``apply_to_*()`` patches the installed stack in place (every module that imported a name) and
returns a `PatchHandle`: ``with apply_to_trl(): trainer.train()``, or ``handle.undo()``. What it could
not patch is in ``handle.not_patched`` and named in a `PatchWarning`. The adapters keep the stacks'
output dtypes. Nothing here imports the stacks (or transformers) until ``apply_to_*`` is called.

``pytest -p cai_kernels.integrations.pytest_plugin --cai-patch STACK`` runs a stack's own test files
with the patch applied (see `pytest_plugin`).
"""

import importlib

from ._patching import PatchHandle, PatchWarning, Unsupported

_PATCHERS = {"apply_to_trl": "trl", "apply_to_openrlhf": "openrlhf", "apply_to_verl": "verl"}


def __getattr__(name: str):
    # the patchers load lazily (each adapter module is cheap, but keeps this package import-free)
    if name in _PATCHERS:
        return getattr(importlib.import_module(f".{_PATCHERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PatchHandle", "PatchWarning", "Unsupported", "apply_to_trl", "apply_to_openrlhf", "apply_to_verl"]
