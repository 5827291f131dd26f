"""token_logprobs against eager and compiled PyTorch on identical inputs."""

import pytest
import torch

import cai_kernels
from cai_kernels.reference import token_logprobs as reference


def eager_gather(logits, targets):
    """What most stacks write: a full fp32 log_softmax, then gather."""
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


_compiled_gather = torch.compile(eager_gather)

VARIANTS = {
    "cai_kernels": lambda x, t: cai_kernels.token_logprobs(x, t),
    "reference": lambda x, t: reference(x, t),
    "eager_log_softmax_gather": eager_gather,
    "compiled_log_softmax_gather": _compiled_gather,
}


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward(benchmark, variant, dtype):
    tokens, vocab = (4096, 49152) if dtype == torch.float32 else (2048, 49152)
    benchmark.group = f"token_logprobs fwd {tokens}x{vocab} {dtype}"
    logits = torch.randn(tokens, vocab).to(dtype)
    targets = torch.randint(0, vocab, (tokens,))
    fn = VARIANTS[variant]
    fn(logits, targets)  # warm-up (compiles)
    benchmark.pedantic(fn, args=(logits, targets), rounds=5, iterations=1)
