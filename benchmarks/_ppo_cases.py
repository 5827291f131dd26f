"""The PPO ops' benchmark cases (test_bench_kl_penalty, _gae, _masked_whiten, _ppo_advantages,
_ppo_policy_loss, _ppo_value_loss): against the reference, torch.compile and the Python GAE loop of
OpenRLHF / veRL.

Rollout batches (B responses x T tokens, right-padded, response lengths uniform in [T/4, T]):
64x512, 256x1024, 512x4096. Inputs: logprobs ~ -|N(0, 1)|, ref_logprobs = logprobs + N(0, 0.1),
values ~ N(0, 1), per-token rewards ~ N(0, 0.1), sequence scores ~ N(0, 1), a PPO ratio near 1.
fwd: no gradient (the post-rollout step: KL, GAE, whitening, advantages); fwd+bwd: the losses and
GRPO's KL term, backward into the new log-probs / values.

``ppo_advantages`` is also timed as the composition of this library's single ops (kl_penalty, the
reward shaping, gae, masked_whiten: what a user would chain without the fused op); the reference of
``gae`` and ``ppo_advantages`` is the reverse Python loop over T, as PPO stacks write it.
torch.compile of a T-step Python loop unrolls it: compiling the reference gae at [64, 512] took 565 s
on this machine (2026-11-25, while shared) and then ran slower than eager (0.14 s vs 0.09 s), so the
compiled reference of those two ops is reported as not practical instead of timed.
"""

from __future__ import annotations

import pytest
import torch

import cai_kernels
from cai_kernels import reference

from . import peers
from ._harness import Step, Variant, backend_of, compile_fn, measure, nbytes, ours, require_op, step_for
from ._machine import device

GAMMA, LAM, KL_COEF = 1.0, 0.95, 0.05
SIZES = [(64, 512), (256, 1024), (512, 4096)]
HEADLINE = (256, 1024)
LOOP_OPS = ("gae", "ppo_advantages")
LOOP_COMPILE = ("torch.compile unrolls the reference's T-step Python loop: compiling gae at [64, 512] took 565 s "
                "here and ran slower than eager; not a practical option")
COMPOSITION = "composition of cai_kernels ops"
PYTHON_GAE = "python GAE loop (openrlhf/verl)"

# the response-mask dtypes the stacks pass (bool: TRL, OpenRLHF; int64: attention masks; float32: veRL);
# the ops whose kernels read the mask in its own dtype are timed with each at the headline size
MASK_DTYPES = (torch.bool, torch.int64, torch.float32)
MASK_DTYPE_OPS = ("masked_whiten", "ppo_advantages")

# op -> modes
OPS = {"kl_penalty": ("fwd", "fwd+bwd"), "gae": ("fwd",), "masked_whiten": ("fwd",), "ppo_advantages": ("fwd",),
       "ppo_policy_loss": ("fwd+bwd",), "ppo_value_loss": ("fwd+bwd",)}



def cases(op: str) -> list[dict]:
    """Every size for the ops that loop over T (and kl_penalty's forward), the headline size for the rest
    (bool masks); the other mask dtypes at the headline size for MASK_DTYPE_OPS."""
    found = [dict(op=op, batch=b, length=t, mode=m) for m in OPS[op] for b, t in SIZES
             if (b, t) == HEADLINE or op in LOOP_OPS or (op == "kl_penalty" and m == "fwd")]
    if op in MASK_DTYPE_OPS:
        found += [dict(op=op, batch=HEADLINE[0], length=HEADLINE[1], mode=OPS[op][0], mask=dtype)
                  for dtype in MASK_DTYPES if dtype != torch.bool]
    return found


def memory_cases(op: str) -> list[dict]:
    return [c for c in cases(op) if (c["batch"], c["length"]) == HEADLINE and "mask" not in c]


def _quick(case: dict) -> bool:
    return (case["batch"], case["length"]) == HEADLINE and case["mode"] == OPS[case["op"]][0]

_compiled = {op: compile_fn(getattr(reference, op)) for op in OPS if hasattr(reference, op) and op not in LOOP_OPS}


def variants(op: str, length: int) -> list[Variant]:
    found = [*ours(op), Variant("reference", "reference")]
    found.append(Variant("reference+torch.compile", "compiled", LOOP_COMPILE if op in LOOP_OPS else None))
    if op == "gae":
        found.append(Variant(PYTHON_GAE, "peer"))
    if op == "ppo_advantages":
        found.append(Variant(COMPOSITION, "baseline"))
    return found


def _inputs(batch: int, length: int) -> dict:
    g = torch.Generator(device=device()).manual_seed(batch * length)
    dev = dict(generator=g, device=device())
    lengths = torch.randint(length // 4, length + 1, (batch,), **dev)
    mask = torch.arange(length, device=device()) < lengths[:, None]
    logprobs = -torch.randn(batch, length, **dev).abs()
    return dict(mask=mask, logprobs=logprobs, ref_logprobs=logprobs + 0.1 * torch.randn(batch, length, **dev),
                old_logprobs=logprobs + 0.05 * torch.randn(batch, length, **dev),
                values=torch.randn(batch, length, **dev), old_values=torch.randn(batch, length, **dev),
                rewards=0.1 * torch.randn(batch, length, **dev), returns=torch.randn(batch, length, **dev),
                advantages=torch.randn(batch, length, **dev), scores=torch.randn(batch, **dev))


def composed_ppo_advantages(scores, logprobs, ref_logprobs, values, response_mask, *, kl_coef, gamma, lam):
    """The fused op's math chained from the single ops (the shaping in plain torch, as a user would)."""
    kl = cai_kernels.kl_penalty(logprobs, ref_logprobs).masked_fill(response_mask == 0, 0.0)
    token_rewards = reference.shape_rewards(kl, scores, response_mask, kl_coef=kl_coef)
    advantages, returns = cai_kernels.gae(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    return cai_kernels.masked_whiten(advantages, response_mask), returns, token_rewards, kl


def build_step(variant: str, *, op: str, batch: int, length: int, mode: str, mask: torch.dtype = torch.bool) -> Step:
    x = _inputs(batch, length)
    mask = x["mask"].to(mask)
    if variant.startswith("cai_kernels["):
        backend = backend_of(variant)
        impl = lambda *a, **k: getattr(cai_kernels, op)(*a, backend=backend, **k)  # noqa: E731
    elif variant == "reference":
        impl = getattr(reference, op)
    elif variant == "reference+torch.compile":
        impl = _compiled[op]
    elif variant == PYTHON_GAE:
        impl = peers.python_gae_loop
    else:
        impl = composed_ppo_advantages
    plane = batch * length * 4  # one fp32 (B, T) tensor
    masks = nbytes(mask)

    if op == "kl_penalty":
        estimator = "k1" if mode == "fwd" else "k3"  # k3: GRPO's KL loss term
        call = lambda: impl(x["logprobs"], x["ref_logprobs"], estimator)  # noqa: E731
        return step_for(mode, call, (x["logprobs"],), bytes_fwd=3 * plane, bytes_bwd=3 * plane)
    if op == "gae":
        if variant == PYTHON_GAE:
            call = lambda: impl(x["rewards"], x["values"], mask, GAMMA, LAM)  # noqa: E731
        else:
            call = lambda: impl(x["rewards"], x["values"], mask, gamma=GAMMA, lam=LAM)  # noqa: E731
        return step_for(mode, call, bytes_fwd=4 * plane + masks)
    if op == "masked_whiten":
        return step_for(mode, lambda: impl(x["advantages"], mask), bytes_fwd=2 * plane + masks)
    if op == "ppo_advantages":
        call = lambda: impl(x["scores"], x["logprobs"], x["ref_logprobs"], x["values"], mask,  # noqa: E731
                            kl_coef=KL_COEF, gamma=GAMMA, lam=LAM)
        return step_for(mode, call, bytes_fwd=7 * plane + masks)
    if op == "ppo_policy_loss":
        call = lambda: impl(x["logprobs"], x["old_logprobs"], x["advantages"], mask)  # noqa: E731
        return step_for(mode, call, (x["logprobs"],), bytes_fwd=3 * plane + masks, bytes_bwd=4 * plane + masks)
    call = lambda: impl(x["values"], x["old_values"], x["returns"], mask)  # noqa: E731
    return step_for(mode, call, (x["values"],), bytes_fwd=3 * plane + masks, bytes_bwd=4 * plane + masks)


def bench_params(op: str) -> list:
    """(case, variant) pytest params of ``op``, the headline case of its first mode marked quick."""
    return [pytest.param(case, variant, marks=[pytest.mark.quick] if _quick(case) else [],
                         id=f"{case['mode']}-{case['batch']}x{case['length']}{_mask_id(case)}-{variant.name}")
            for case in cases(op) for variant in variants(op, case["length"])
            if "mask" not in case or variant.kind == "ours"]


def _mask_id(case: dict) -> str:
    return f"-mask_{str(case['mask']).removeprefix('torch.')}" if "mask" in case else ""


def run(benchmark, request, module: str, case: dict, variant: Variant) -> None:
    """One timed case of the benchmark module ``module`` (whose build_step is this module's)."""
    require_op(case["op"])
    if variant.name == COMPOSITION:
        require_op("kl_penalty", "gae", "masked_whiten")
    measure(benchmark, request, module=module, op=case["op"], variant=variant, case=case, mode=case["mode"],
            x_name="B*T", x_value=case["batch"] * case["length"],
            group=f"{case['op']} {case['mode']} [{case['batch']}, {case['length']}]{_mask_id(case)}")
