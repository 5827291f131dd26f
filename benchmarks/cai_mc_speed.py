"""`cai eval mc` (the batched scorer) vs the naive scorer on the paper's HHH questions, embedded model.

    .venv/bin/python benchmarks/cai_mc_speed.py --limit 60 --threads 1 [--order naive-first|fast-first]

Both scorers run in this process with the same thread count on the same questions; prints both times
(wall clock, and CPU time of this process, which is the fairer measure on a machine shared with other
jobs), the ratios, both accuracies and the largest difference between their option probabilities, and
writes the numbers as JSON (--out). The naive scorer (tests/naive_mc.py) runs one full forward per option with a
float64 log-softmax over the vocabulary at every position.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `cai` command sets it

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="paper:438HHHEvaluations.jsonl")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", type=int, help="first N questions (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order", choices=("naive-first", "fast-first"), default="fast-first")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    from cai.data import load_mc_questions
    from cai.evals import mc_eval
    from cai.models import load_model
    from naive_mc import naive_mc_eval

    torch.set_num_threads(args.threads)
    questions = load_mc_questions(args.data, limit=args.limit)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    results = {}
    for name in (("naive", "fast") if args.order == "naive-first" else ("fast", "naive")):
        start, cpu_start = time.perf_counter(), time.process_time()
        if name == "fast":
            results[name] = mc_eval(model, tokenizer, questions)
        else:
            results[name] = naive_mc_eval(model, tokenizer, questions)
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["cpu_seconds"] = time.process_time() - cpu_start
        print(f"{name}: {results[name]['seconds']:.1f} s wall, {results[name]['cpu_seconds']:.1f} s CPU, "
              f"accuracy {results[name]['accuracy']:.4f}", flush=True)
    fast, naive = results["fast"], results["naive"]
    max_diff = max(abs(a - b) for p, q in zip(fast["probs"], naive["probs"]) for a, b in zip(p, q))
    summary = {"data": args.data, "n": len(questions), "threads": args.threads, "fast_seconds": fast["seconds"],
               "naive_seconds": naive["seconds"], "speedup": naive["seconds"] / fast["seconds"],
               "fast_cpu_seconds": fast["cpu_seconds"], "naive_cpu_seconds": naive["cpu_seconds"],
               "cpu_speedup": naive["cpu_seconds"] / fast["cpu_seconds"],
               "fast_accuracy": fast["accuracy"], "naive_accuracy": naive["accuracy"], "max_prob_diff": max_diff,
               "fast_mean_correct_prob": fast["mean_correct_prob"]}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "fast_probs": fast["probs"], "naive_probs": naive["probs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
