"""lm-eval's `hf` backend vs cai's (`--model cai`) on a multiple-choice file as a local lm-eval task.

    .venv/bin/python benchmarks/lm_eval_speed.py --limit 40 --rounds 2          # a subset, orders alternated
    .venv/bin/python benchmarks/lm_eval_speed.py --out benchmarks/results/NAME.json   # all 438 HHH questions

Both backends evaluate the same task (cai.harness.write_mc_task: the paper's HHH file by default) through
`lm_eval.simple_evaluate`, on one model object loaded once (fp32), with the same batch size and torch thread
count, in this process, one after the other (round r runs hf first when r is even, cai first when odd). Per
backend and round: wall time of the whole simple_evaluate call and of its loglikelihood call alone, CPU time of
this process, lm-eval's accuracy; across backends: the largest |difference| of any request's log-likelihood,
how many is_greedy flags differ, and the load average (the machine may be shared: compare CPU times too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `cai` command sets it

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("hf", "cai")


def _load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _timed_loglikelihood(lm, record: dict):
    """Wrap lm.loglikelihood so its wall time lands in record["loglikelihood_seconds"]."""
    inner = lm.loglikelihood

    def loglikelihood(requests, disable_tqdm=False):
        start = time.perf_counter()
        try:
            return inner(requests, disable_tqdm=disable_tqdm)
        finally:
            record["loglikelihood_seconds"] = record.get("loglikelihood_seconds", 0.0) + time.perf_counter() - start
    lm.loglikelihood = loglikelihood


def _evaluate(lm, task: str, task_manager, limit) -> tuple[dict, dict[tuple[int, int], tuple[float, bool]]]:
    """(timings and accuracy, {(doc_id, choice): (loglikelihood, is_greedy)})."""
    import lm_eval

    record = {"load_average_before": _load_average()}
    _timed_loglikelihood(lm, record)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=limit, log_samples=True,
                                  verbosity="WARNING")
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start
    record["load_average_after"] = _load_average()
    record["accuracy"] = out["results"][task]["acc,none"]
    answers = {}
    for sample in out["samples"][task]:
        for choice, resp in enumerate(sample["resps"]):
            logprob, greedy = resp[0]
            answers[(sample["doc_id"], choice)] = (float(logprob), bool(greedy))
    return record, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="paper:438HHHEvaluations.jsonl")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", type=int, help="first N questions (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch_size, for both backends")
    parser.add_argument("--rounds", type=int, default=1, help="run both backends this many times, orders alternated")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(ROOT))
    from benchmarks._machine import cpu_model
    from cai.harness import CaiLM, write_mc_task
    from cai.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    folder = Path(tempfile.mkdtemp(prefix="cai-lmeval-task-"))
    task = "cai_bench_mc"
    write_mc_task(args.data, folder, name=task)
    task_manager = TaskManager(include_path=str(folder), include_defaults=False)  # only the local task
    lms = {"hf": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
           "cai": CaiLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)}
    # load the task once untimed: the first load builds the datasets cache the later ones read
    task_manager.load([task])
    rounds, answers = [], {}
    for r in range(args.rounds):
        for name in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            record, answers[name] = _evaluate(lms[name], task, task_manager, args.limit)
            rounds.append({"round": r, "backend": name, **record})
            print(f"round {r} {name}: {record['seconds']:.1f} s wall ({record['loglikelihood_seconds']:.1f} s "
                  f"scoring), {record['cpu_seconds']:.1f} s CPU, accuracy {record['accuracy']:.4f}, load "
                  f"{record['load_average_before'][0]:.1f} -> {record['load_average_after'][0]:.1f}", flush=True)
    hf, ours = answers["hf"], answers["cai"]
    if hf.keys() != ours.keys():
        raise SystemExit("error: the two backends answered different requests")
    diff = max(abs(hf[k][0] - ours[k][0]) for k in hf)
    greedy_mismatches = sum(hf[k][1] != ours[k][1] for k in hf)

    def total(name, key):
        return sum(r[key] for r in rounds if r["backend"] == name)
    summary = {
        "data": args.data, "model": args.model, "n_questions": len({k[0] for k in hf}), "n_requests": len(hf),
        "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
        "hf_seconds": total("hf", "seconds"), "cai_seconds": total("cai", "seconds"),
        "speedup": total("hf", "seconds") / total("cai", "seconds"),
        "scoring_speedup": total("hf", "loglikelihood_seconds") / total("cai", "loglikelihood_seconds"),
        "cpu_speedup": total("hf", "cpu_seconds") / total("cai", "cpu_seconds"),
        "hf_accuracy": rounds[-1]["accuracy"] if rounds[-1]["backend"] == "hf" else rounds[-2]["accuracy"],
        "cai_accuracy": rounds[-1]["accuracy"] if rounds[-1]["backend"] == "cai" else rounds[-2]["accuracy"],
        "max_abs_loglikelihood_diff": diff, "is_greedy_mismatches": greedy_mismatches,
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
        "rounds_detail": rounds,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}, indent=2))
    if args.out:
        keys = sorted(hf)
        Path(args.out).write_text(json.dumps({**summary, "requests": [list(k) for k in keys],
                                              "hf_loglikelihoods": [hf[k][0] for k in keys],
                                              "cai_loglikelihoods": [ours[k][0] for k in keys]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
