"""Forward + backward of per-token log-probs through an LM head, as each implementation runs it.

Shared by the timing benchmarks and the peak-memory measurements (``benchmarks/_memory.py`` imports
``fwd_bwd_step`` by name in a fresh process).
"""

from __future__ import annotations

import torch

import cai_kernels
from cai_kernels.reference import linear_token_logprobs as reference


def eager_head_gather(hidden, weight, targets):
    """What most stacks write: the full logits, a full log_softmax, then gather."""
    return (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled_head_gather = torch.compile(eager_head_gather)

VARIANTS = {
    "cai_kernels": lambda h, w, t: cai_kernels.linear_token_logprobs(h, w, t),
    "reference": lambda h, w, t: reference(h, w, t),
    "eager_head_log_softmax_gather": eager_head_gather,
    "compiled_head_log_softmax_gather": _compiled_head_gather,
}


def make_inputs(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """hidden (tokens, H) and weight (V, H) as leaves that require grad (logits ~ N(0, 1)), targets (tokens,)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return hidden, weight, targets


def fwd_bwd_step(variant: str, tokens: int, hidden_size: int, vocab: int, dtype: str = "float32"):
    """A zero-argument step: clear the gradients, then forward + backward of the summed log-probs."""
    hidden, weight, targets = make_inputs(tokens, hidden_size, vocab, getattr(torch, dtype))
    fn = VARIANTS[variant]

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).sum().backward()

    return step
