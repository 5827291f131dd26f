"""Python host time per op call: what a GPU user waits for at small sizes, measured on a CPU.

A GPU launch is asynchronous, so at small sizes an op costs what its Python, the dispatcher and its launches
cost on the host. This script times every op on tiny tensors (a handful of rows) on this CPU, one thread:

  triton   the Triton path with every kernel launch replaced by a no-op (``benchmarks/_launches.py``): our
           Python, validation, allocation and autograd around the launches, nothing else. The number a GPU
           user pays on top of Triton's own launcher (~5-15 us a launch, see launches/call). The checks that
           read tensor data follow the GPU policy (off: on a GPU they run on the device), though the tensors
           are on the CPU.
  cpu      the C++ kernels, run for real on the tiny tensors (a few us of the total is the kernels').
  eager    the op's reference (plain PyTorch, eager) on the same tensors: what one would write instead.

Each op is timed as a no-grad forward ("fwd") and, if differentiable, as forward + backward of its first
output ("fwd+bwd": inputs require grad, ``torch.autograd.backward``). Times are the min over repeats of the
mean of a batch of calls, in microseconds of the calling thread's CPU time (``time.thread_time``: the shared
machines this runs on are often loaded, and time spent preempted is not the code's); launches/call counts the
device launches of one triton-path call.

    python -m benchmarks.host_time [--paths triton,cpu,eager] [--ops kl_penalty,gae] [--json FILE]

Targets (issue 10): triton path, no-grad forward <= 10 us, forward+backward <= 50 us.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

if __name__ == "__main__":  # before triton is imported: the interpreter decides at @triton.jit time
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

TARGET_FWD_US = 10.0
TARGET_FWD_BWD_US = 50.0
PATHS = ("triton", "cpu", "eager")


@dataclass
class Case:
    """One op on tiny inputs: ``make(backend, grad)`` returns (``fn``, ``leaves``): the op is ``fn(*leaves)``, the
    leaves its differentiable inputs (requiring grad with ``grad``; none for the non-differentiable ops)."""

    op: str
    make: Callable[[str | None, bool], tuple[Callable[[], object], tuple[torch.Tensor, ...]]]
    differentiable: bool = True


def cases(device: str | torch.device = "cpu") -> list[Case]:
    """Every op on tiny inputs on ``device`` (the timed calls here; the launch-count, CUDA-graph and
    torch.func tests use them too)."""
    import cai_kernels as ck

    def rows(B=4, T=8):
        return torch.randn(B, T, device=device)

    def ints(high, *shape):
        return torch.randint(0, high, shape, device=device)

    def token_logprobs(backend, grad):
        logits = torch.randn(8, 32, device=device, requires_grad=grad)
        targets = ints(32, 8)
        return lambda lg: ck.token_logprobs(lg, targets, backend=backend), (logits,)

    def linear_token_logprobs(backend, grad):
        hidden = torch.randn(8, 16, device=device, requires_grad=grad)
        weight = torch.randn(32, 16, device=device, requires_grad=grad)
        targets = ints(32, 8)
        return lambda h, w: ck.linear_token_logprobs(h, w, targets, backend=backend), (hidden, weight)

    def choice_logprobs(backend, grad):
        logits = torch.randn(6, 32, device=device, requires_grad=grad)
        targets = ints(32, 6)
        option_ids = torch.tensor([0, 0, 1, 2, 2, 3], device=device)
        num_options = torch.tensor([2, 2], device=device)
        return (lambda lg: ck.choice_logprobs(targets, option_ids, num_options, logits=lg, backend=backend),
                (logits,))

    def pairwise_loss(backend, grad):
        chosen = torch.randn(8, device=device, requires_grad=grad)
        rejected = torch.randn(8, device=device, requires_grad=grad)
        return lambda c, r: ck.pairwise_loss(c, r, backend=backend), (chosen, rejected)

    def last_token_rewards(backend, grad):
        hidden = torch.randn(4, 8, 16, device=device, requires_grad=grad)
        weight = torch.randn(16, device=device, requires_grad=grad)
        mask = torch.ones(4, 8, dtype=torch.bool, device=device)
        return lambda h, w: ck.last_token_rewards(h, mask, w, backend=backend), (hidden, weight)

    def reward_pairwise_loss(backend, grad):
        chosen = torch.randn(4, 8, 16, device=device, requires_grad=grad)
        rejected = torch.randn(4, 8, 16, device=device, requires_grad=grad)
        weight = torch.randn(16, device=device, requires_grad=grad)
        mask = torch.ones(4, 8, dtype=torch.bool, device=device)
        return (lambda c, r, w: ck.reward_pairwise_loss(c, mask, r, mask, w, backend=backend),
                (chosen, rejected, weight))

    def ranked_pairwise_loss(backend, grad):
        rewards = torch.randn(4, 3, device=device, requires_grad=grad)
        return lambda r: ck.ranked_pairwise_loss(r, backend=backend), (rewards,)

    def reward_ranked_loss(backend, grad):
        hidden = torch.randn(2, 3, 8, 16, device=device, requires_grad=grad)
        weight = torch.randn(16, device=device, requires_grad=grad)
        mask = torch.ones(2, 3, 8, dtype=torch.bool, device=device)
        return lambda h, w: ck.reward_ranked_loss(h, mask, w, backend=backend), (hidden, weight)

    def kl_penalty(backend, grad):
        logprobs, ref = rows().requires_grad_(grad), rows()
        return lambda lp: ck.kl_penalty(lp, ref, "k3", backend=backend), (logprobs,)

    mask = torch.rand(4, 8, device=device) < 0.7

    def gae(backend, grad):
        rewards, values = rows(), rows()
        return lambda: ck.gae(rewards, values, mask, backend=backend), ()

    def masked_whiten(backend, grad):
        x = rows()
        return lambda: ck.masked_whiten(x, mask, backend=backend), ()

    def ppo_advantages(backend, grad):
        scores, logprobs, ref, values = torch.randn(4, device=device), rows(), rows(), rows()
        return lambda: ck.ppo_advantages(scores, logprobs, ref, values, mask, kl_coef=0.1, backend=backend), ()

    def ppo_policy_loss(backend, grad):
        logprobs, old, advantages = rows().requires_grad_(grad), rows(), rows()
        return lambda lp: ck.ppo_policy_loss(lp, old, advantages, mask, backend=backend), (logprobs,)

    def ppo_value_loss(backend, grad):
        values, old, returns = rows().requires_grad_(grad), rows(), rows()
        return lambda v: ck.ppo_value_loss(v, old, returns, mask, backend=backend), (values,)

    return [Case("token_logprobs", token_logprobs), Case("linear_token_logprobs", linear_token_logprobs),
            Case("choice_logprobs", choice_logprobs), Case("pairwise_loss", pairwise_loss),
            Case("last_token_rewards", last_token_rewards), Case("reward_pairwise_loss", reward_pairwise_loss),
            Case("ranked_pairwise_loss", ranked_pairwise_loss), Case("reward_ranked_loss", reward_ranked_loss),
            Case("kl_penalty", kl_penalty), Case("gae", gae, False), Case("masked_whiten", masked_whiten, False),
            Case("ppo_advantages", ppo_advantages, False), Case("ppo_policy_loss", ppo_policy_loss),
            Case("ppo_value_loss", ppo_value_loss)]


def _first(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def timed_step(case: Case, backend: str | None, mode: str) -> Callable[[], object]:
    """The call to time: a no-grad forward, or forward + backward of the first output."""
    fn, leaves = case.make(backend, mode == "fwd+bwd")

    def call():
        return fn(*leaves)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return call()
        return forward
    probe = _first(call())
    seed = torch.ones_like(probe)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(_first(call()), seed)
    return forward_backward


def time_us(step: Callable[[], object], *, budget_s: float = 0.25, repeats: int = 7) -> float:
    """Min over ``repeats`` of the mean time of a batch of calls sized to ``budget_s`` / repeats, in us."""
    clock = time.thread_time
    step()
    step()
    start = clock()
    step()
    once = max(clock() - start, 1e-6)
    batch = max(5, int(budget_s / repeats / once))
    best = float("inf")
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = clock()
            for _ in range(batch):
                step()
            best = min(best, (clock() - start) / batch)
    finally:
        if gc_was:
            gc.enable()
    return best * 1e6


@contextlib.contextmanager
def gpu_data_check_policy():
    """The ops' host-side data checks as on a GPU without ``cai_kernels.debug()``: off (on CPU tensors they run)."""
    import importlib
    import pkgutil

    import cai_kernels.ops as package

    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    patched = [m for m in modules if hasattr(m, "host_data_checks")]
    originals = [m.host_data_checks for m in patched]
    for m in patched:
        m.host_data_checks = lambda device: False
    try:
        yield
    finally:
        for m, original in zip(patched, originals):
            m.host_data_checks = original


def launches_per_call(case: Case, mode: str, backend: str = "triton"):
    """The device launches of one call (a warm one): the LaunchCounter (Triton kernels + PyTorch ops that would
    launch on CUDA), with the GPU's data-check policy."""
    from benchmarks._launches import LaunchCounter, torch_launches, triton_launches

    counter = LaunchCounter(run=False)
    with triton_launches(counter=counter), gpu_data_check_policy():
        step = timed_step(case, backend, mode)
        step()
        counter.reset()
        with torch_launches(counter):
            step()
    return counter


def measure(paths=PATHS, ops: list[str] | None = None, budget_s: float = 0.25) -> list[dict]:
    """One row per (op, mode): host time per path (us) and the triton path's launches per call."""
    from benchmarks._launches import triton_launches

    torch.set_num_threads(1)
    rows = []
    for case in cases():
        if ops and case.op not in ops:
            continue
        for mode in ("fwd", "fwd+bwd") if case.differentiable else ("fwd",):
            row = {"op": case.op, "mode": mode}
            for path in paths:
                if path == "triton":
                    with triton_launches(run=False), gpu_data_check_policy():
                        row["triton_us"] = time_us(timed_step(case, "triton", mode), budget_s=budget_s)
                    row["launches"] = launches_per_call(case, mode).total
                else:
                    backend = "cpu" if path == "cpu" else "reference"
                    row[f"{path}_us"] = time_us(timed_step(case, backend, mode), budget_s=budget_s)
            rows.append(row)
    return rows


def table(rows: list[dict], paths=PATHS) -> str:
    head = ["op", "mode"] + [f"{p} us" for p in paths] + (["launches/call", "target"] if "triton" in paths else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["op"], row["mode"]] + [f"{row[f'{p}_us']:.1f}" for p in paths]
        if "triton" in paths:
            target = TARGET_FWD_US if row["mode"] == "fwd" else TARGET_FWD_BWD_US
            cells += [str(row["launches"]), f"<= {target:.0f} us: {'PASS' if row['triton_us'] <= target else 'FAIL'}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: triton, cpu, eager")
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of calls per measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {PATHS}")
    rows = measure(paths, [o for o in args.ops.split(",") if o], args.budget)
    print(table(rows, paths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
