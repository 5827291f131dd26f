"""Every adapter keeps its stack's output dtypes: each adapter (TRL's fused LM head included) x bf16 / fp16 /
fp32 inputs (mixed) x mask dtypes (bool, int64, float32, bfloat16), against the stack's own function from PyPI.

The stacks compute in their inputs' precision and let PyTorch's type promotion pick the result's
dtype (a float32 mask or a ``+ 1e-8`` on an integer count makes bf16 losses fp32); our ops compute in
fp32 and the adapters cast to that dtype. Values are compared too, with a tolerance for the stack's
half-precision rounding. A case where the stack itself raises (veRL's GAE on a bool mask: ``1 - mask``)
is not compared.
"""

from __future__ import annotations

import itertools
import typing

import pytest
import torch

from _stack_modules import method_from_source, openrlhf_modules

trl_utils = pytest.importorskip("trl.trainer.utils")
verl_F = pytest.importorskip("verl.utils.torch_functional")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
loaded = openrlhf_modules()
if loaded is None:
    pytest.skip("openrlhf is not installed (make install installs it with --no-deps)", allow_module_level=True)
orl_utils, orl_loss, EXPERIENCE_MAKER = loaded

from cai_kernels.integrations import openrlhf as A_orl  # noqa: E402
from cai_kernels.integrations import trl as A_trl  # noqa: E402
from cai_kernels.integrations import verl as A_verl  # noqa: E402

_SCOPE = {"torch": torch, "Tuple": typing.Tuple, "List": typing.List, "Optional": typing.Optional}
ORL_GAE = method_from_source(EXPERIENCE_MAKER, "RemoteExperienceMaker", "get_advantages_and_returns", _SCOPE)
ORL_RETURNS = method_from_source(EXPERIENCE_MAKER, "RemoteExperienceMaker", "get_cumulative_returns", _SCOPE)
# the stacks' own functions, captured before any test patches them
trl_chunked = pytest.importorskip("trl.kernels.chunked_logprob")
THEIRS = {
    "trl.ChunkedLogProbFunction": trl_chunked.ChunkedLogProbFunction,
    "trl.selective_log_softmax": trl_utils.selective_log_softmax,
    "trl.entropy_from_logits": trl_utils.entropy_from_logits,
    "trl.selective_log_softmax_and_entropy": trl_utils.selective_log_softmax_and_entropy,
    "orl.log_probs_from_logits": orl_utils.log_probs_from_logits,
    "orl.compute_entropy": orl_utils.compute_entropy,
    "orl.compute_approx_kl": orl_utils.compute_approx_kl,
    "orl.PairWiseLoss": orl_loss.PairWiseLoss, "orl.LogExpLoss": orl_loss.LogExpLoss,
    "orl.ValueLoss": orl_loss.ValueLoss,
    "verl.logprobs_from_logits": verl_F.logprobs_from_logits,
    "verl.entropy_from_logits": verl_F.entropy_from_logits,
    "verl.masked_whiten": verl_F.masked_whiten,
    "verl.kl_penalty": core_algos.kl_penalty,
    "verl.compute_gae_advantage_return": core_algos.compute_gae_advantage_return,
    "verl.compute_policy_loss_vanilla": core_algos.compute_policy_loss_vanilla,
    "verl.compute_value_loss": core_algos.compute_value_loss,
}

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
MASKS = [torch.bool, torch.int64, torch.float32, torch.bfloat16]
B, T, V = 3, 7, 13


def _x(dtype, seed, shape=(B, T), scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _mask(dtype):
    mask = torch.ones(B, T)
    mask[0, 5:] = 0  # right padding
    mask[1, 2] = 0  # a hole (multi-turn observation token)
    return mask.to(dtype)


class _Config(dict):
    __getattr__ = dict.__getitem__


_ACTOR = _Config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info={})


def _name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32", torch.bool: "bool",
            torch.int64: "i64", None: "none"}[dtype]


def adapter_chunked(hidden, weight, bias, targets):
    return A_trl.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.7, 8)


def _cases():
    """(id, ours(), theirs(), positions to compare values at or None)."""
    cases = []

    def add(name, ours, theirs, where=None):
        # the stack rounds intermediates to its inputs' precision: the tolerance follows the lowest one
        low = "bf16" if "bf16" in name else "f16" if "f16-" in name or name.endswith("f16") else "f32"
        cases.append(pytest.param(ours, theirs, where, low, id=name))

    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    top_k = torch.randint(0, V, (B, T, 3), generator=torch.Generator().manual_seed(1))
    for dt in FLOATS:
        logits = _x(dt, 2, (B, T, V), scale=3.0)
        n = _name(dt)
        add(f"trl.selective_log_softmax-{n}", lambda lg=logits: A_trl.selective_log_softmax(lg, labels),
            lambda lg=logits: THEIRS["trl.selective_log_softmax"](lg, labels))
        add(f"trl.selective_log_softmax-topk-{n}", lambda lg=logits: A_trl.selective_log_softmax(lg, top_k, 0.7),
            lambda lg=logits: THEIRS["trl.selective_log_softmax"](lg, top_k, 0.7))
        add(f"trl.entropy_from_logits-{n}", lambda lg=logits: A_trl.entropy_from_logits(lg),
            lambda lg=logits: THEIRS["trl.entropy_from_logits"](lg))
        for md in [torch.bool, torch.int64]:
            rm = _mask(md)
            add(f"trl.selective_log_softmax-{n}-rowmask-{_name(md)}",
                lambda lg=logits, rm=rm: A_trl.selective_log_softmax(lg, labels, row_mask=rm),
                lambda lg=logits, rm=rm: THEIRS["trl.selective_log_softmax"](lg, labels, row_mask=rm))
            add(f"trl.selective_log_softmax_and_entropy-{n}-rowmask-{_name(md)}",
                lambda lg=logits, rm=rm: A_trl.selective_log_softmax_and_entropy(lg, labels, temperature=0.8,
                                                                                 row_mask=rm),
                lambda lg=logits, rm=rm: THEIRS["trl.selective_log_softmax_and_entropy"](lg, labels, temperature=0.8,
                                                                                         row_mask=rm))
        add(f"orl.log_probs_from_logits-{n}", lambda lg=logits: A_orl.log_probs_from_logits(lg.clone(), labels, 0.7),
            lambda lg=logits: THEIRS["orl.log_probs_from_logits"](lg.clone(), labels, 0.7))
        add(f"orl.compute_entropy-{n}", lambda lg=logits: A_orl.compute_entropy(lg),
            lambda lg=logits: THEIRS["orl.compute_entropy"](lg))
        add(f"verl.logprobs_from_logits-{n}", lambda lg=logits: A_verl.logprobs_from_logits(lg, labels),
            lambda lg=logits: THEIRS["verl.logprobs_from_logits"](lg, labels))
        add(f"verl.entropy_from_logits-{n}", lambda lg=logits: A_verl.entropy_from_logits(lg),
            lambda lg=logits: THEIRS["verl.entropy_from_logits"](lg))

    targets = torch.randint(0, 20, (6,), generator=torch.Generator().manual_seed(9))
    for dh, dw, with_bias in itertools.product(FLOATS, (torch.bfloat16, torch.float32), (False, True)):
        hidden, weight = _x(dh, 10, (6, 8)), _x(dw, 11, (20, 8))
        bias = _x(dw, 12, (20,)) if with_bias else None
        add(f"trl.ChunkedLogProbFunction-{_name(dh)}-{_name(dw)}-bias={with_bias}",
            lambda h=hidden, w=weight, b=bias: adapter_chunked(h, w, b, targets),
            lambda h=hidden, w=weight, b=bias: THEIRS["trl.ChunkedLogProbFunction"].apply(h, w, b, targets, 0.7, 8))

    for d1, d2 in itertools.product(FLOATS, FLOATS):
        a, b, c = _x(d1, 3), _x(d2, 4), _x(d1, 5, scale=2.0)
        pair = f"{_name(d1)}-{_name(d2)}"
        for est in ("k1", "k2", "k3"):
            add(f"orl.compute_approx_kl-{est}-{pair}", lambda a=a, b=b, e=est: A_orl.compute_approx_kl(a, b, None, e),
                lambda a=a, b=b, e=est: THEIRS["orl.compute_approx_kl"](a, b, None, e))
        for est in ("kl", "abs", "mse", "low_var_kl", "k3+"):
            add(f"verl.kl_penalty-{est}-{pair}", lambda a=a, b=b, e=est: A_verl.kl_penalty(a, b, e),
                lambda a=a, b=b, e=est: THEIRS["verl.kl_penalty"](a, b, e))
        chosen, rejected = _x(d1, 6, (8,), 2.0), _x(d2, 7, (8,), 2.0)
        for margin_dtype in (None, torch.float32, torch.bfloat16):
            margin = None if margin_dtype is None else _x(margin_dtype, 8, (8,)).abs()
            for cls in ("PairWiseLoss", "LogExpLoss"):
                add(f"orl.{cls}-{pair}-margin-{_name(margin_dtype)}",
                    lambda cls=cls, m=margin, c=chosen, r=rejected: getattr(A_orl, cls)()(c, r, m),
                    lambda cls=cls, m=margin, c=chosen, r=rejected: THEIRS[f"orl.{cls}"]()(c, r, m))
        for md in MASKS:
            mask, on = _mask(md), _mask(torch.bool)
            case = f"{pair}-mask-{_name(md)}"
            add(f"orl.get_advantages_and_returns-{case}",
                lambda a=a, b=b, m=mask: A_orl.get_advantages_and_returns(a, b, m, 0.99, 0.95),
                lambda a=a, b=b, m=mask: ORL_GAE(None, a, b, m, 0.99, 0.95))
            add(f"orl.get_cumulative_returns-{case}", lambda b=b, m=mask: A_orl.get_cumulative_returns(b, m, 0.9),
                lambda b=b, m=mask: ORL_RETURNS(None, b, m, 0.9))
            for token_level, clip in itertools.product((True, False), (None, 0.2)):
                add(f"orl.ValueLoss-token_level={token_level}-clip={clip}-{case}",
                    lambda a=a, b=b, c=c, m=mask, t=token_level, k=clip: A_orl.ValueLoss(k, t)(a, c, b, m),
                    lambda a=a, b=b, c=c, m=mask, t=token_level, k=clip: THEIRS["orl.ValueLoss"](k, t)(a, c, b, m))
            add(f"verl.compute_gae_advantage_return-{case}",
                lambda a=a, b=b, m=mask: A_verl.compute_gae_advantage_return(a, b, m, 1.0, 0.95),
                lambda a=a, b=b, m=mask: THEIRS["verl.compute_gae_advantage_return"](a, b, m, 1.0, 0.95), on)
            add(f"verl.masked_whiten-{case}", lambda a=a, m=mask: A_verl.masked_whiten(a, m),
                lambda a=a, m=mask: THEIRS["verl.masked_whiten"](a, m), on)
            for agg in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"):
                add(f"verl.compute_policy_loss_vanilla-{agg}-{case}",
                    lambda a=a, b=b, c=c, m=mask, g=agg: A_verl.compute_policy_loss_vanilla(b, a, c, m, g, _ACTOR),
                    lambda a=a, b=b, c=c, m=mask, g=agg: THEIRS["verl.compute_policy_loss_vanilla"](b, a, c, m, g,
                                                                                                   _ACTOR))
                add(f"verl.compute_value_loss-{agg}-{case}",
                    lambda a=a, b=b, c=c, m=mask, g=agg: A_verl.compute_value_loss(a, b, c, m, 0.2, g),
                    lambda a=a, b=b, c=c, m=mask, g=agg: THEIRS["verl.compute_value_loss"](a, b, c, m, 0.2, g))
    return cases


def _flatten(out):
    if out is None:  # an output TRL's fused head was not asked for
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # veRL's metrics: Python floats
        return [torch.tensor(v, dtype=torch.float64) for _, v in sorted(out.items())]
    return [t for item in out for t in _flatten(item)]


TOLERANCE = {"bf16": dict(rtol=8e-2, atol=8e-2), "f16": dict(rtol=1e-2, atol=1e-2), "f32": dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("ours,theirs,where,low", _cases())
def test_adapter_keeps_the_stack_dtype(ours, theirs, where, low):
    try:
        expected = _flatten(theirs())
    except RuntimeError as err:  # the stack rejects these dtypes (veRL's GAE: `1 - bool_mask`)
        pytest.skip(f"the stack itself raises: {err}")
    got = _flatten(ours())
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    for a, b in zip(got, expected):
        if where is not None and a.shape == where.shape:
            a, b = a[where], b[where]
        torch.testing.assert_close(a.double(), b.double(), **TOLERANCE[low], equal_nan=True)
