"""linear_token_logprobs (LM head fused with the log-probs) against eager and compiled PyTorch.

Forward + backward on SmolLM2-135M's head: hidden [2048, 576], weight [49152, 576]. Each variant also
records its peak extra memory (beyond inputs and gradients, measured in a fresh process by
``benchmarks/_memory.py``) in the benchmark's extra_info.
"""

import pytest

from benchmarks._linear_variants import VARIANTS, fwd_bwd_step
from benchmarks._memory import peak_extra_bytes

SHAPE = {"tokens": 2048, "hidden_size": 576, "vocab": 49152}


@pytest.mark.quick
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fwd_bwd(benchmark, variant):
    benchmark.group = "linear_token_logprobs fwd+bwd 2048x576 @ 49152x576 fp32"
    step = fwd_bwd_step(variant, **SHAPE)
    step()  # warm-up (compiles)
    benchmark.pedantic(step, rounds=3, iterations=1)
    memory = peak_extra_bytes("benchmarks._linear_variants:fwd_bwd_step", variant=variant, **SHAPE)
    benchmark.extra_info["peak_extra_MB"] = round(memory.extra / 2**20, 1)
