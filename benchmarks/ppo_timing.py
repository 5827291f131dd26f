"""Timing helpers for the PPO ops, shared by the benchmark suite (test_bench_ppo.py) and runnable on
its own for the acceptance table:

    .venv/bin/python benchmarks/ppo_timing.py [--steady-malloc] [--compile-loop]

Everything is timed as the minimum wall-clock time over many repeats (the machine is shared: the
minimum is the least disturbed run), after a warm-up, with inputs that stay the same across runs.

glibc malloc and fresh outputs: a call that frees >= 2 MB of outputs at once (the fused op returns
four 1 MB tensors at [256, 1024]) lets glibc trim the heap, and the next call page-faults its
outputs in again (~1000 faults, 1-3 ms here). Long-running training processes rarely see this
(their mmap / trim thresholds have grown), so ``--steady-malloc`` sets the thresholds such a process
ends up with (M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD 128 MB) before timing; the table says which.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cai_kernels  # noqa: E402
from cai_kernels import reference  # noqa: E402

SHAPE = (256, 1024)


def steady_malloc() -> bool:
    """glibc: keep freed memory in the heap (as a long-running process effectively does). True if set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))


def best_of(fn, *, repeat: int = 100, warmup: int = 3) -> float:
    """Minimum wall-clock seconds of one call over ``repeat`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class PPOBatch:
    """A post-rollout batch: right-padded responses with a few multi-turn holes."""

    scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    response_mask: torch.Tensor

    @classmethod
    def random(cls, B: int, T: int, *, dtype=torch.float32, seed: int = 0) -> "PPOBatch":
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        mask &= torch.rand(B, T, generator=g) > 0.05
        return cls(
            scores=torch.randn(B, generator=g),
            logprobs=(-torch.rand(B, T, generator=g) * 3).to(dtype),
            ref_logprobs=(-torch.rand(B, T, generator=g) * 3).to(dtype),
            values=torch.randn(B, T, generator=g).to(dtype),
            rewards=torch.randn(B, T, generator=g).to(dtype),
            response_mask=mask,
        )

    def gae_bytes(self) -> int:
        """Bytes read and written once by gae: rewards, values, mask in; advantages, returns out."""
        B, T = self.rewards.shape
        return (self.rewards.element_size() + self.values.element_size() + self.response_mask.element_size()
                + 2 * 4) * B * T


def unfused_ppo_advantages(batch: PPOBatch, *, kl_coef: float = 0.05, estimator: str = "k1", backend=None):
    """The post-rollout step composed from our own ops: kl_penalty, the shaping, gae, masked_whiten."""
    kl = torch.where(batch.response_mask, cai_kernels.kl_penalty(batch.logprobs, batch.ref_logprobs, estimator,
                                                                 backend=backend), 0.0)
    rewards = reference.shape_rewards(kl, batch.scores, batch.response_mask, kl_coef=kl_coef)
    advantages, returns = cai_kernels.gae(rewards, batch.values, batch.response_mask, backend=backend)
    return cai_kernels.masked_whiten(advantages, batch.response_mask, backend=backend), returns, rewards, kl


def fused_ppo_advantages(batch: PPOBatch, *, kl_coef: float = 0.05, estimator: str = "k1", backend=None):
    return cai_kernels.ppo_advantages(batch.scores, batch.logprobs, batch.ref_logprobs, batch.values,
                                      batch.response_mask, kl_coef=kl_coef, estimator=estimator, backend=backend)


def read_bandwidth() -> float:
    """Bytes per second of one pass over a 512 MB fp32 tensor (torch.sum), best of 5."""
    x = torch.ones(128 << 20)
    seconds = best_of(lambda: x.sum(), repeat=5, warmup=1)
    return x.numel() * 4 / seconds


def compile_reference_gae(batch: PPOBatch):
    """torch.compile of the reference loop (T unrolled by dynamo): (compiled fn, compile seconds)."""
    compiled = torch.compile(reference.gae)
    start = time.perf_counter()
    compiled(batch.rewards, batch.values, batch.response_mask)
    return compiled, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steady-malloc", action="store_true", help="set glibc's thresholds first (see above)")
    parser.add_argument("--compile-loop", action="store_true", help="also time torch.compile of the reference loop")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    malloc = "steady (mallopt)" if args.steady_malloc and steady_malloc() else "glibc defaults"
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T = SHAPE
    batch = PPOBatch.random(B, T)
    r, v, m = batch.rewards, batch.values, batch.response_mask
    print(f"PPO ops on [{B}, {T}] fp32, bool mask; threads={torch.get_num_threads()}; malloc: {malloc}")

    bandwidth = read_bandwidth()
    floor = batch.gae_bytes() / bandwidth
    t_gae = best_of(lambda: cai_kernels.gae(r, v, m), repeat=300)
    t_gae_op = best_of(lambda: torch.ops.cai_kernels_cpu.gae_fwd(r, v, m, 1.0, 0.95), repeat=300)
    tiny = PPOBatch.random(2, 4)
    t_tiny = best_of(lambda: cai_kernels.gae(tiny.rewards, tiny.values, tiny.response_mask), repeat=300)
    t_tiny_op = best_of(lambda: torch.ops.cai_kernels_cpu.gae_fwd(tiny.rewards, tiny.values, tiny.response_mask,
                                                                  1.0, 0.95), repeat=300)
    t_loop = best_of(lambda: reference.gae(r, v, m), repeat=5, warmup=1)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> one pass over gae's in/outputs "
          f"({batch.gae_bytes() / 1e6:.2f} MB): {floor * 1e3:.3f} ms")
    print(f"gae cai_kernels (cpu)        {t_gae * 1e3:8.3f} ms   {t_loop / t_gae:6.1f}x the loop, "
          f"{t_gae / floor:.2f}x the one-pass floor")
    print(f"  of which the C++ op call   {t_gae_op * 1e3:8.3f} ms   (Python + custom-op overhead "
          f"{(t_tiny - t_tiny_op) * 1e6:.0f} us, seen on [2, 4]: {t_tiny * 1e6:.0f} us vs {t_tiny_op * 1e6:.0f} us)")
    print(f"gae reference loop (eager)   {t_loop * 1e3:8.3f} ms")
    if args.compile_loop:
        compiled, compile_seconds = compile_reference_gae(batch)
        t_compiled = best_of(lambda: compiled(r, v, m), repeat=20)
        print(f"gae torch.compile(loop)      {t_compiled * 1e3:8.3f} ms   (compile took {compile_seconds:.0f} s; "
              f"cai_kernels is {t_compiled / t_gae:.1f}x faster)")

    t_fused = best_of(lambda: fused_ppo_advantages(batch), repeat=200)
    t_unfused = best_of(lambda: unfused_ppo_advantages(batch), repeat=200)
    t_ref = best_of(lambda: reference.ppo_advantages(batch.scores, batch.logprobs, batch.ref_logprobs, batch.values,
                                                     m, kl_coef=0.05), repeat=5, warmup=1)
    fused, unfused = fused_ppo_advantages(batch), unfused_ppo_advantages(batch)
    max_diff = max((a - b).abs().max().item() for a, b in zip(fused, unfused))
    print(f"ppo_advantages fused         {t_fused * 1e3:8.3f} ms   {t_unfused / t_fused:.2f}x the composition, "
          f"max |fused - composed| = {max_diff:.1e}")
    print(f"  composed from our ops      {t_unfused * 1e3:8.3f} ms")
    print(f"  reference (loop)           {t_ref * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
