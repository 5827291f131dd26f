"""One GPU call for the row split of token_logprobs (cai_kernels/triton/token_logprobs.py, issue 10 part 3):
correctness of every forced pieces count on CUDA, then the forward timed at 64-16384 rows, vocabulary
49152 and 151936, bf16 (and fp32 at the acceptance shapes), against torch.compile and eager. Prints one
table per shape as it goes and a summary last (the acceptance lines: bf16 at 4096 and 8192 rows, at least
1x torch.compile); full numbers go to a JSON file.

    python -m benchmarks.token_logprobs_gpu [--out DIR] [--rows 4096 8192] [--vocabs 49152] [--budget S]
    python -m benchmarks.token_logprobs_gpu --dry-run     # CPU, Triton's interpreter, tiny shapes

Variants of our forward (each timed two ways, see below):
  op               cai_kernels.token_logprobs(backend="triton"): what users call, the split rule's pieces
  op, no check     the same with the launcher's target-range check stubbed out (it reads the targets back:
                   a host-device sync per call); the difference is what that sync costs
  pieces=P         the launcher with the check stubbed and every row forced into P programs (1, 2, 4, 8,
                   16, 32 up to the row's blocks / 2); pieces=1 is the unsplit kernel
  pieces=1 1-block the unsplit kernel without PREFETCH (one block in flight: the kernel of 2026-11-25)
  torch.compile    the reference compiled (default mode, static shapes), as the benchmark suite does
  eager            the reference
Timings: "sync ms" is the benchmark suite's measure (benchmarks/_harness.py: wall clock of one call and
a torch.cuda.synchronize, min over calls): host time included; "gpu ms" is triton.testing.do_bench
(CUDA events around back-to-back calls, median): host time hidden unless the call itself syncs. The
inputs rotate over enough copies (>= 256 MB) that no call finds its logits in L2.
The summary names, per shape, the pieces the rule picks and the fastest forced count: where they differ,
the rule's constants (RESIDENT_PROGRAMS_PER_SM, PROGRAM_START_SECONDS, MERGE_SECONDS, MIN_SPLIT_GAIN)
need the measured values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before triton is imported: the interpreter decides at @triton.jit time
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import cai_kernels  # noqa: E402
from cai_kernels._params import TokenLogprobsParams  # noqa: E402
from cai_kernels.reference import token_logprobs as reference  # noqa: E402
from cai_kernels.triton import token_logprobs as tk  # noqa: E402

ROWS = [64, 256, 1024, 4096, 8192, 16384]
VOCABS = [49152, 151936]
ACCEPTANCE = [(4096, 49152), (8192, 49152)]  # bf16, at least 1x torch.compile (issue 10)
FP32_SHAPES = ACCEPTANCE
ROTATE_BYTES = 256 * 2**20
if DRY_RUN:  # shapes that cross piece and block edges (10 blocks of 32) in the interpreter, in about a minute
    ROWS, VOCABS, ACCEPTANCE, FP32_SHAPES, ROTATE_BYTES = [2], [300], [(3, 300)], [(3, 300)], 0
    tk.MAX_BLOCK_V = 32


def device() -> torch.device:
    return torch.device("cpu" if DRY_RUN else "cuda")


def log(*parts) -> None:
    print(*parts, flush=True)


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


@contextlib.contextmanager
def knobs(*, pieces: int | None = None, prefetch: bool = True, check: bool = True):
    """The launcher's test knobs (FORCE_PIECES, PREFETCH) and, with check=False, no target-range check
    (where the launcher still has one: a launcher that checks on the device needs no stub)."""
    saved = tk.FORCE_PIECES, tk.PREFETCH
    saved_check = getattr(tk, "check_targets_in_range", None)
    tk.FORCE_PIECES, tk.PREFETCH = pieces, prefetch
    if not check and saved_check is not None:
        tk.check_targets_in_range = lambda *args, **kwargs: None
    try:
        yield
    finally:
        tk.FORCE_PIECES, tk.PREFETCH = saved
        if saved_check is not None:
            tk.check_targets_in_range = saved_check


def make_sets(rows: int, vocab: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bytes_per_set = rows * vocab * torch.finfo(dtype).bits // 8
    count = max(1, min(8, math.ceil(ROTATE_BYTES / bytes_per_set)))
    generator = torch.Generator(device=device()).manual_seed(rows + vocab)
    return [(torch.randn(rows, vocab, generator=generator, device=device(), dtype=dtype) * 3,
             torch.randint(0, vocab, (rows,), generator=generator, device=device())) for _ in range(count)]


def rotating(fn, sets):
    state = {"i": 0}

    def step():
        logits, targets = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(logits, targets)
    return step


def sync_ms(step, calls: int) -> float:
    """The benchmark suite's measure: min over calls of (one call + synchronize), wall clock."""
    best = math.inf
    for _ in range(calls):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def gpu_ms(step) -> float:
    if DRY_RUN:
        return sync_ms(step, 1)
    return triton.testing.do_bench(step, warmup=10, rep=100, return_mode="median")


def launcher(logits, targets):
    """tk.token_logprobs_fwd as the op calls it (no autograd, no op dispatch): (rows, 1, V) view."""
    return tk.token_logprobs_fwd(logits.view(logits.size(0), 1, logits.size(1)), targets,
                                 TokenLogprobsParams(1.0, None, False))


def forced_pieces(vocab: int) -> list[int]:
    most = min(triton.cdiv(vocab, tk.block_v(vocab)) // tk.MIN_BLOCKS_PER_PIECE, tk.MAX_PIECES)
    return [p for p in (1, 2, 4, 8, 16, 32) if p == 1 or p <= most]


def compiled_reference():
    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # one static-shape graph per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    # --dry-run: the eager backend (the CPU's C++ compile would take minutes), the same code path
    return torch.compile(reference, dynamic=False, backend="eager" if DRY_RUN else "inductor")


# -- correctness ---------------------------------------------------------------------------------------

def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def correctness(vocabs) -> list[dict]:
    """Forward (log-probs, entropy, temperature 0.7, ignore_index) and the gradient of every forced pieces
    count against the float64 reference at a few rows; bf16 inputs (errors are fp32-accumulation sized)."""
    rows = 6 if DRY_RUN else 96
    out = []
    for vocab in vocabs:
        logits, targets = make_sets(rows, vocab, torch.bfloat16)[0]
        targets[::5] = -100
        leaf = logits.double().requires_grad_()
        ref_logp, ref_entropy = reference(leaf, targets, temperature=0.7, ignore_index=-100, return_entropy=True)
        weights = torch.rand_like(ref_logp)
        (ref_logp * weights + 0.3 * ref_entropy).sum().backward()
        for pieces in [None] + forced_pieces(vocab):
            with knobs(pieces=pieces):
                x = logits.detach().requires_grad_()
                logp, entropy = cai_kernels.token_logprobs(x, targets, temperature=0.7, ignore_index=-100,
                                                           return_entropy=True, backend="triton")
                (logp * weights.float() + 0.3 * entropy).sum().backward()
            row = dict(vocab=vocab, rows=rows, pieces=pieces or "rule", logp_err=max_error(logp, ref_logp),
                       entropy_err=max_error(entropy, ref_entropy), grad_err=max_error(x.grad, leaf.grad))
            # bf16 gradient: one rounding of values <= 1 (2^-8 relative); fp32 forward accumulation
            row["ok"] = row["logp_err"] < 2e-3 and row["entropy_err"] < 2e-3 and row["grad_err"] < 8e-3
            log(f"correctness V={vocab} pieces={row['pieces']}: logp {row['logp_err']:.2e} entropy "
                f"{row['entropy_err']:.2e} grad {row['grad_err']:.2e} {'ok' if row['ok'] else 'FAIL'}")
            out.append(row)
    return out


# -- timings -------------------------------------------------------------------------------------------

def time_shape(rows: int, vocab: int, dtype: torch.dtype, *, with_pieces: bool = True) -> list[dict]:
    sets = make_sets(rows, vocab, dtype)
    calls = 1 if DRY_RUN else 50
    compiled = compiled_reference()
    variants = [("op", lambda l, t: cai_kernels.token_logprobs(l, t, backend="triton"), {}),
                ("op, no check", lambda l, t: cai_kernels.token_logprobs(l, t, backend="triton"), {"check": False})]
    if with_pieces:
        variants += [(f"pieces={p}", launcher, {"pieces": p, "check": False}) for p in forced_pieces(vocab)]
        variants.append(("pieces=1 1-block", launcher, {"pieces": 1, "prefetch": False, "check": False}))
    variants += [("torch.compile", compiled, {}), ("eager", reference, {})]
    rule = tk.split_pieces(rows, vocab, tk.block_v(vocab), torch.finfo(dtype).bits // 8, tk.sm_count(device()))
    out = []
    for name, fn, settings in variants:
        with knobs(**settings):
            step = rotating(fn, sets)
            step()  # compile / autotune / first touch outside the timing
            row = dict(rows=rows, vocab=vocab, dtype=str(dtype).removeprefix("torch."), variant=name,
                       rule_pieces=rule, sync_ms=sync_ms(step, calls), gpu_ms=gpu_ms(step))
        row["gbps"] = rows * vocab * torch.finfo(dtype).bits / 8 / (row["gpu_ms"] * 1e6)
        out.append(row)
    base = next(r for r in out if r["variant"] == "torch.compile")
    log(f"\n{dtype} [{rows}, {vocab}] (the rule: {rule} piece{'s' if rule > 1 else ''})")
    log(f"{'variant':<18}{'sync ms':>10}{'gpu ms':>10}{'GB/s':>8}{'vs compile (sync)':>19}{'(gpu)':>8}")
    for r in out:
        r["vs_compile_sync"] = base["sync_ms"] / r["sync_ms"]
        r["vs_compile_gpu"] = base["gpu_ms"] / r["gpu_ms"]
        log(f"{r['variant']:<18}{r['sync_ms']:>10.3f}{r['gpu_ms']:>10.3f}{r['gbps']:>8.0f}"
            f"{r['vs_compile_sync']:>18.2f}x{r['vs_compile_gpu']:>7.2f}x")
    return out


def time_fwd_bwd(rows: int, vocab: int) -> list[dict]:
    """bf16 forward + backward (log-probs summed), ours (the rule's pieces) against torch.compile."""
    sets = make_sets(rows, vocab, torch.bfloat16)
    compiled = compiled_reference()
    out = []
    for name, fn in (("op", lambda l, t: cai_kernels.token_logprobs(l, t, backend="triton")),
                     ("torch.compile", compiled)):
        def step_fn(logits, targets, fn=fn):
            x = logits.detach().requires_grad_()
            fn(x, targets).sum().backward()
        step = rotating(step_fn, sets)
        step()
        out.append(dict(rows=rows, vocab=vocab, dtype="bfloat16", variant=f"{name} fwd+bwd",
                        sync_ms=sync_ms(step, 1 if DRY_RUN else 30), gpu_ms=gpu_ms(step)))
    log(f"\nbf16 fwd+bwd [{rows}, {vocab}]: " + ", ".join(f"{r['variant']} {r['sync_ms']:.3f} ms (sync) "
                                                        f"{r['gpu_ms']:.3f} ms (gpu)" for r in out))
    return out


def summary(rows_out: list[dict], correct: list[dict]) -> str:
    lines = ["", "== token_logprobs split: summary",
             f"correctness: {sum(r['ok'] for r in correct)}/{len(correct)} cases within tolerance"]
    shapes = list(dict.fromkeys((r["dtype"], r["rows"], r["vocab"]) for r in rows_out))  # in timing order
    lines.append(f"{'dtype':<9}{'rows':>6}{'V':>8}{'rule':>6}{'fastest':>9}{'op/compile sync':>17}{'gpu':>7}"
                 f"{'op no-check sync':>18}{'best pieces gpu':>17}")
    for dtype, rows, vocab in shapes:
        case = [r for r in rows_out if (r["dtype"], r["rows"], r["vocab"]) == (dtype, rows, vocab)]
        by = {r["variant"]: r for r in case}
        forced = [r for r in case if r["variant"].startswith("pieces=") and "1-block" not in r["variant"]]
        fastest = min(forced, key=lambda r: r["gpu_ms"])
        lines.append(f"{dtype:<9}{rows:>6}{vocab:>8}{case[0]['rule_pieces']:>6}{fastest['variant'][7:]:>9}"
                     f"{by['op']['vs_compile_sync']:>16.2f}x{by['op']['vs_compile_gpu']:>6.2f}x"
                     f"{by['op, no check']['vs_compile_sync']:>17.2f}x{fastest['vs_compile_gpu']:>16.2f}x")
    lines.append("acceptance (issue 10): bf16 token_logprobs at 4096 and 8192 rows at least 1x torch.compile "
                 "(the suite's measure: sync)")
    for rows, vocab in ACCEPTANCE:
        op = next((r for r in rows_out if r["dtype"] == "bfloat16" and r["rows"] == rows and r["vocab"] == vocab
                   and r["variant"] == "op"), None)
        if op:
            verdict = "PASS" if op["vs_compile_sync"] >= 1 else "FAIL"
            lines.append(f"  [{rows}, {vocab}] bf16: {op['vs_compile_sync']:.2f}x (gpu {op['vs_compile_gpu']:.2f}x) "
                         f"{verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu-out"))
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--vocabs", type=int, nargs="+", default=VOCABS)
    parser.add_argument("--budget", type=float, default=480, help="seconds; later shapes are skipped past it")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args(argv)
    if not DRY_RUN and not torch.cuda.is_available():
        log("error: no CUDA device (use --dry-run to check the script on a CPU)")
        return 2
    deadline = time.monotonic() + args.budget
    if not DRY_RUN:
        log(f"{torch.cuda.get_device_name()}: {tk.sm_count(device())} SMs; torch {torch.__version__}, "
            f"triton {triton.__version__}")
    correct = correctness(args.vocabs)
    # the acceptance shapes first: a run cut short by the budget still answers them
    shapes = [(r, v, torch.bfloat16) for r, v in ACCEPTANCE]
    shapes += [(r, v, torch.bfloat16) for v in args.vocabs for r in args.rows if (r, v) not in ACCEPTANCE]
    shapes += [(r, v, torch.float32) for r, v in FP32_SHAPES]
    rows_out, skipped = [], []
    for rows, vocab, dtype in shapes:
        if time.monotonic() > deadline:
            skipped.append(f"{dtype} [{rows}, {vocab}]")
            continue
        rows_out += time_shape(rows, vocab, dtype)
    fwd_bwd = []
    for rows, vocab in ([(8192, 49152), (256, 151936)] if not DRY_RUN else [(3, 300)]):
        if time.monotonic() > deadline:
            skipped.append(f"fwd+bwd [{rows}, {vocab}]")
            continue
        fwd_bwd += time_fwd_bwd(rows, vocab)
    text = summary(rows_out, correct)
    if skipped:
        text += "\nskipped (over --budget): " + ", ".join(skipped)
    log(text)
    os.makedirs(args.out, exist_ok=True)
    name = "dry-run" if DRY_RUN else torch.cuda.get_device_name().replace(" ", "-").lower()
    path = os.path.join(args.out, f"token-logprobs-split-{name}.json")
    with open(path, "w") as f:
        json.dump(dict(correctness=correct, forward=rows_out, fwd_bwd=fwd_bwd, skipped=skipped, summary=text), f,
                  indent=1)
    log(f"wrote {path}")
    return 0 if all(r["ok"] for r in correct) else 1


if __name__ == "__main__":
    sys.exit(main())
