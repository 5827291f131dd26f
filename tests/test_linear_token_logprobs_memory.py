"""linear_token_logprobs keeps one logits block, not tokens x V: peak memory measured in fresh processes."""

import pytest

from benchmarks._memory import peak_extra_bytes

FACTORY = "benchmarks._linear_variants:fwd_bwd_step"
HIDDEN, VOCAB = 64, 32768
MB = 2**20


@pytest.mark.slow
def test_peak_memory_does_not_grow_like_tokens_times_vocab():
    small, large = 1024, 4096
    logits_bytes = lambda tokens: tokens * VOCAB * 4  # noqa: E731 - an fp32 [tokens, V] tensor
    ours = {n: peak_extra_bytes(FACTORY, variant="cai_kernels", tokens=n, hidden_size=HIDDEN, vocab=VOCAB).extra
            for n in (small, large)}
    eager = peak_extra_bytes(FACTORY, variant="eager_head_log_softmax_gather", tokens=small, hidden_size=HIDDEN,
                             vocab=VOCAB).extra
    # the measurement sees the logits when they exist (eager keeps several [tokens, V] tensors alive)
    assert eager > logits_bytes(small), f"eager peak {eager / MB:.0f} MB"
    growth = ours[large] - ours[small]
    assert ours[large] < 0.1 * logits_bytes(large), f"peak {ours[large] / MB:.0f} MB at {large} tokens"
    assert growth < 0.1 * (logits_bytes(large) - logits_bytes(small)), f"grew by {growth / MB:.0f} MB"
