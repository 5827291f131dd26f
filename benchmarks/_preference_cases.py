"""The preference-model ops' benchmark cases (test_bench_pairwise_loss, _last_token_rewards,
_reward_pairwise_loss, _ranked_pairwise_loss, _reward_ranked_loss): against the reference,
torch.compile and what TRL / OpenRLHF / HF compute.

Cases (PM training shapes): pairwise_loss and ranked_pairwise_loss on reward tensors (B pairs, or
B prompts x K ranked responses); last_token_rewards, reward_pairwise_loss and reward_ranked_loss on
the final hidden states (B, T, H) of padded sequences (lengths uniform in [T/4, T]; chosen right-padded,
rejected left-padded) with the scalar head (H,). Soft labels in (0, 1). fwd+bwd: backward of the loss
into the rewards / hidden states and the head.

Peers: TRL's and OpenRLHF's reward-model loss ``-logsigmoid(chosen - rejected - margin).mean()``
(hard labels: the soft-label term is ours); HF's sequence-classification head (what TRL's
RewardTrainer trains): ``score`` applied to every position, then the last real token picked.
Fewest bytes: each input read once, outputs written once (the hidden-state ops read only the last
real token's row per sequence, plus the masks; their backward writes the dense hidden gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cai_kernels
from cai_kernels import reference

from ._harness import (Step, Variant, backend_of, compile_fn, dtype_name, measure, nbytes, ours, require_op,
                       step_for)
from ._machine import device

F32, BF16 = torch.float32, torch.bfloat16
OPS = ("pairwise_loss", "last_token_rewards", "reward_pairwise_loss", "ranked_pairwise_loss", "reward_ranked_loss")
_SCALE = 4 if torch.cuda.is_available() else 1

# op -> [(case, in the quick subset?)]. PM batches are small (64-512 pairs): latency matters there; the
# million-pair case shows the bandwidth.
CASES = {
    "pairwise_loss": [(dict(batch=512, dtype=F32, mode="fwd+bwd"), False),
                      (dict(batch=65536, dtype=F32, mode="fwd+bwd"), True),
                      (dict(batch=1048576 * _SCALE, dtype=F32, mode="fwd"), False),
                      (dict(batch=1048576 * _SCALE, dtype=F32, mode="fwd+bwd"), False)],
    "ranked_pairwise_loss": [(dict(batch=4096, k=8, dtype=F32, mode="fwd+bwd"), True),
                             (dict(batch=65536 * _SCALE, k=8, dtype=F32, mode="fwd+bwd"), False),
                             (dict(batch=4096, k=32, dtype=F32, mode="fwd"), False)],
    "last_token_rewards": [(dict(batch=64, length=1024, hidden=576, dtype=d, mode="fwd+bwd"), d == F32)
                           for d in (F32, BF16)],
    "reward_pairwise_loss": [(dict(batch=64, length=1024, hidden=576, dtype=F32, mode="fwd"), False),
                             (dict(batch=64, length=1024, hidden=576, dtype=F32, mode="fwd+bwd"), True),
                             (dict(batch=64, length=1024, hidden=576, dtype=BF16, mode="fwd+bwd"), False),
                             (dict(batch=16 * _SCALE, length=2048, hidden=2048, dtype=BF16, mode="fwd+bwd"), False)],
    "reward_ranked_loss": [(dict(batch=16, k=4, length=512, hidden=576, dtype=F32, mode="fwd+bwd"), True)],
}


def memory_cases(op: str) -> list[dict]:
    if op not in ("reward_pairwise_loss", "reward_ranked_loss"):
        return []
    return [dict(op=op, **c) for c, _ in CASES[op] if c["dtype"] == F32 and c["batch"] in (64, 16)]

_compiled = {op: compile_fn(getattr(reference, op)) for op in OPS}
PEERS = {"pairwise_loss": "trl/openrlhf -logsigmoid(c - r - m).mean()",
         "reward_pairwise_loss": "hf score head on every token + trl loss",
         "last_token_rewards": "hf score head on every token"}


def variants(op: str) -> list[Variant]:
    found = [*ours(op), Variant("reference", "reference"), Variant("reference+torch.compile", "compiled")]
    return found + ([Variant(PEERS[op], "peer")] if op in PEERS else [])


# -- the peers, re-expressed (each a few lines in its project) ---------------------------------------------

def trl_pairwise_loss(chosen, rejected, margin=None):
    """TRL RewardTrainer / OpenRLHF PairWiseLoss: -logsigmoid(chosen - rejected - margin).mean()."""
    d = chosen - rejected if margin is None else chosen - rejected - margin
    return -F.logsigmoid(d).mean()


def hf_score_rewards(hidden, mask, head_weight, head_bias):
    """transformers' *ForSequenceClassification: the score head on every position (B, T), then the
    reward at the last non-padding token (the rightmost position whose mask is set)."""
    scores = F.linear(hidden, head_weight.reshape(1, -1).to(hidden.dtype), head_bias.reshape(1).to(hidden.dtype))
    scores = scores.squeeze(-1)  # (B, T)
    last = (mask.to(torch.int64) * torch.arange(mask.size(-1), device=mask.device)).argmax(-1)
    return scores[torch.arange(scores.size(0), device=scores.device), last].float()


def hf_reward_pairwise_loss(chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, head_weight, head_bias):
    chosen = hf_score_rewards(chosen_hidden, chosen_mask, head_weight, head_bias)
    rejected = hf_score_rewards(rejected_hidden, rejected_mask, head_weight, head_bias)
    return trl_pairwise_loss(chosen, rejected), chosen, rejected


# -- inputs and steps ----------------------------------------------------------------------------------

def _padded_mask(generator, batch, length, *shape_prefix, left=False):
    lengths = torch.randint(length // 4, length + 1, (*shape_prefix, batch), generator=generator, device=device())
    positions = torch.arange(length, device=device())
    return positions >= (length - lengths)[..., None] if left else positions < lengths[..., None]


def build_step(variant: str, *, op: str, mode: str, dtype: torch.dtype, **sizes) -> Step:
    g = torch.Generator(device=device()).manual_seed(sum(sizes.values()))
    dev = dict(device=device())

    def randn(*shape, dt=dtype):
        return torch.randn(shape, generator=g, dtype=dt, **dev)

    if variant.startswith("cai_kernels["):
        impl = _with_backend(getattr(cai_kernels, op), backend_of(variant))
    elif variant == "reference":
        impl = getattr(reference, op)
    elif variant == "reference+torch.compile":
        impl = _compiled[op]
    else:
        impl = {"pairwise_loss": trl_pairwise_loss, "reward_pairwise_loss": hf_reward_pairwise_loss,
                "last_token_rewards": hf_score_rewards}[op]
    peer = variant == PEERS.get(op)

    if op == "pairwise_loss":
        b = sizes["batch"]
        chosen, rejected = randn(b), randn(b)
        labels = torch.rand(b, generator=g, **dev)
        call = (lambda: impl(chosen, rejected)) if peer else (lambda: impl(chosen, rejected, soft_labels=labels))
        io = nbytes(chosen, rejected, labels)
        return step_for(mode, call, (chosen, rejected), bytes_fwd=io, bytes_bwd=io + nbytes(chosen, rejected))
    if op == "ranked_pairwise_loss":
        rewards = randn(sizes["batch"], sizes["k"])
        return step_for(mode, lambda: impl(rewards), (rewards,), bytes_fwd=nbytes(rewards),
                        bytes_bwd=2 * nbytes(rewards))

    b, t, h = sizes["batch"], sizes["length"], sizes["hidden"]
    head_weight, head_bias = randn(h, dt=torch.float32) / h ** 0.5, randn(1, dt=torch.float32)[0]
    if op == "reward_ranked_loss":
        k = sizes["k"]
        hidden, mask = randn(b, k, t, h), _padded_mask(g, k, t, b)
        rows = b * k * h * hidden.element_size()
        return step_for(mode, lambda: impl(hidden, mask, head_weight, head_bias), (hidden, head_weight),
                        bytes_fwd=rows + nbytes(mask), bytes_bwd=rows + nbytes(hidden))
    hidden, mask = randn(b, t, h), _padded_mask(g, b, t)
    rows = b * h * hidden.element_size()
    if op == "last_token_rewards":
        return step_for(mode, lambda: impl(hidden, mask, head_weight, head_bias), (hidden, head_weight),
                        bytes_fwd=rows + nbytes(mask), bytes_bwd=rows + nbytes(hidden))
    rejected_hidden, rejected_mask = randn(b, t, h), _padded_mask(g, b, t, left=True)
    labels = torch.rand(b, generator=g, **dev)
    args = (hidden, mask, rejected_hidden, rejected_mask, head_weight, head_bias)
    call = (lambda: impl(*args)) if peer else (lambda: impl(*args, soft_labels=labels))
    return step_for(mode, call, (hidden, rejected_hidden, head_weight), bytes_fwd=2 * (rows + nbytes(mask)),
                    bytes_bwd=2 * (rows + nbytes(hidden)))


def _with_backend(fn, backend):
    return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)


def _label(case: dict) -> str:
    dims = [case[k] for k in ("batch", "k", "length", "hidden") if k in case]
    return f"{case['mode']} [{', '.join(map(str, dims))}] {dtype_name(case['dtype'])}"


def bench_params(op: str) -> list:
    """(case, variant) pytest params of ``op``, its quick cases marked."""
    return [pytest.param(dict(op=op, **case), variant, marks=[pytest.mark.quick] if quick else [],
                         id=f"{_label(case).replace(' ', '-')}-{variant.name}")
            for case, quick in CASES[op] for variant in variants(op)]


def run(benchmark, request, module: str, case: dict, variant: Variant) -> None:
    """One timed case of the benchmark module ``module`` (whose build_step is this module's)."""
    op = case["op"]
    require_op(op)
    measure(benchmark, request, module=module, op=op, variant=variant, case=case, mode=case["mode"],
            x_name="pairs" if op == "pairwise_loss" else "batch", x_value=case["batch"], group=f"{op} {_label(case)}")
