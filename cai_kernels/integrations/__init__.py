"""Drop-in adapters for RLHF stacks: the stacks' own function names and semantics, computed with cai_kernels.

    cai_kernels.integrations.trl       selective_log_softmax, entropy_from_logits, the fused LM head
    cai_kernels.integrations.openrlhf  log_probs_from_logits, compute_approx_kl, GAE, PairWiseLoss, ...
    cai_kernels.integrations.verl      logprobs_from_logits, kl_penalty, compute_gae_advantage_return, ...

Each ``apply_to_*()`` patches the installed stack in place (every module that imported a name) and
returns a `PatchHandle`: ``with apply_to_trl(): trainer.train()``, or ``handle.undo()``. Nothing here
imports the stacks (or transformers) until ``apply_to_*`` is called.
"""

from ._patching import PatchHandle, Unsupported


def apply_to_trl() -> PatchHandle:
    from .trl import apply_to_trl as apply
    return apply()


def apply_to_openrlhf() -> PatchHandle:
    from .openrlhf import apply_to_openrlhf as apply
    return apply()


def apply_to_verl() -> PatchHandle:
    from .verl import apply_to_verl as apply
    return apply()


__all__ = ["PatchHandle", "Unsupported", "apply_to_trl", "apply_to_openrlhf", "apply_to_verl"]
