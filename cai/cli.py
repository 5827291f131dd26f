"""`cai`: the command line over the library.

    cai run --config tiny --out runs/demo          every stage in order (finished ones skipped, a killed one resumed)
    cai <stage> --config tiny --out runs/demo      one stage: critique-revise, sft, sample-pairs, label, train-pm,
                                                   ppo, evaluate (reads the previous stage's dataset, or --input)
    cai label --engine ray [--ray-address A]      a batch stage (critique-revise, sample-pairs, label) on a Ray
                                                   actor pool, one model per actor; the same rows as --engine local
    torchrun --nproc_per_node N -m cai.cli sft ... a training stage (sft, train-pm, ppo) data-parallel over N ranks
    cai eval mc --data FILE.jsonl [--model M] [--limit N] [--json]
    cai eval mc --data paper:* --chain-of-thought [--samples N]   every eval file of the paper's folder, reasoning first
    cai eval pm --model RUN/train_pm/model [--data paper:438HHHEvaluations.jsonl]   a PM on the HHH comparisons
    cai report --out runs/demo                     rewrite report.md from a run folder
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# OpenMP threads that spin while waiting cost several times their work when the cores are shared (measured
# here: 6x slower generation with 2 spinning threads on a busy 2-core box); set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import preset_names
from .stages import STAGES


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set label.principles_per_comparison=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    ray_stages = ", ".join(s.name.replace("_", "-") for s in STAGES if s.scale_out == "ray")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help=f"run the batches of {ray_stages} in this process "
                        "or on a Ray actor pool (one model per actor; identical rows)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.add_argument("--actors", type=int, help="Ray actor-pool size (default: what the cluster's GPUs / CPUs allow)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs (and torch threads) per actor (default 1)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 if the cluster has GPUs)")


def _engine(args) -> tuple[str, dict]:
    options = {"address": getattr(args, "ray_address", None), "actors": getattr(args, "actors", None),
               "cpus_per_actor": getattr(args, "cpus_per_actor", None),
               "gpus_per_actor": getattr(args, "gpus_per_actor", None)}
    return getattr(args, "engine", "local"), {k: v for k, v in options.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="The Constitutional AI loop on cai_kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every stage in order, then write report.md")
    _add_run_args(run)
    _add_engine_args(run)
    for stage in STAGES:
        p = sub.add_parser(stage.name.replace("_", "-"), help=f"run the {stage.name} stage in a run folder")
        _add_run_args(p)
        if stage.scale_out == "ray":
            _add_engine_args(p)
        if isinstance(stage.input, str):  # one dataset, which --input may replace
            p.add_argument("--input", help="read this dataset folder or JSONL file instead of the previous stage's")
    report = sub.add_parser("report", help="rewrite report.md from a run folder")
    report.add_argument("--out", required=True)
    evals = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval_command", required=True)
    mc = evals.add_parser("mc", help="multiple-choice eval of a file in the paper's format "
                                     "(prompt, corrects, incorrects)")
    mc.add_argument("--data", required=True, help="a JSONL file, builtin:harmless_mc, or paper:NAME")
    mc.add_argument("--model", default="embedded", help="HF id, local folder, or 'embedded' (default)")
    mc.add_argument("--limit", type=int, help="score only the first N questions")
    mc.add_argument("--json", action="store_true", help="print one JSON object: n, accuracy, probs, ...")
    mc.add_argument("--batch-tokens", type=int, default=2048, help="prompt tokens per forward batch")
    mc.add_argument("--threads", type=int, help="torch CPU threads")
    mc.add_argument("--device", default="auto")
    mc.add_argument("--dtype", default="auto")
    mc.add_argument("--allow-download", action="store_true")
    mc.add_argument("--chain-of-thought", action="store_true",
                    help="let the model reason first (the question as a Human/Assistant dialogue, 'Let's think step "
                         "by step:'), then score the options after 'So the answer is:'")
    mc.add_argument("--samples", type=_positive, default=1,
                    help="with --chain-of-thought: reasoning samples per question (temperature 1), option "
                         "probabilities averaged; 1 = greedy reasoning (default)")
    mc.add_argument("--few-shot", type=int, default=2,
                    help="with --chain-of-thought: worked chain-of-thought examples of our constitution in front")
    mc.add_argument("--max-new-tokens", type=_positive, default=128, help="with --chain-of-thought: reasoning length")
    mc.add_argument("--seed", type=int, default=0)
    pm = evals.add_parser("pm", help="a preference model on the comparisons of an eval file (the HHH questions' "
                                     "text_correct / text_incorrect transcripts)")
    pm.add_argument("--data", default="paper:438HHHEvaluations.jsonl", help="an eval file with text_correct / "
                                                                             "text_incorrect (default: the HHH evals)")
    pm.add_argument("--model", required=True, help="a preference model folder (a run's train_pm/model)")
    pm.add_argument("--limit", type=_positive, help="the first N comparisons")
    pm.add_argument("--batch-size", type=_positive, default=8)
    pm.add_argument("--json", action="store_true", help="print one JSON object: n, accuracy, rewards")
    pm.add_argument("--threads", type=int, help="torch CPU threads")
    pm.add_argument("--device", default="auto")
    pm.add_argument("--dtype", default="auto")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def _eval_mc(args) -> int:
    """Every eval file --data names (a file, or a folder / paper:* / a glob: each file of the eval format in it)."""
    import torch

    from .data import eval_files, load_mc_questions
    from .evals import cot_fewshot, mc_eval, mc_eval_cot
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    files = eval_files([args.data])
    for spec, _, problem in files:
        if problem:
            print(f"{spec}: skipped: {problem}", file=sys.stderr)
    specs = [spec for spec, _, problem in files if not problem]
    if not specs:
        print(f"error: {args.data}: no file in the paper's eval format (prompt, corrects, incorrects)", file=sys.stderr)
        return 1
    questions = {spec: load_mc_questions(spec, limit=args.limit) for spec in specs}  # every file read first
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, allow_download=args.allow_download)
    fewshot = cot_fewshot(args.few_shot, seed=args.seed) if args.chain_of_thought else ""
    for spec in specs:
        if args.chain_of_thought:
            result = mc_eval_cot(model, tokenizer, questions[spec], samples=args.samples,
                                 max_new_tokens=args.max_new_tokens, fewshot=fewshot,
                                 max_batch_tokens=args.batch_tokens, seed=args.seed, progress=not args.json)
        else:
            result = mc_eval(model, tokenizer, questions[spec], max_batch_tokens=args.batch_tokens,
                             progress=not args.json)
        mode = {"chain_of_thought": args.chain_of_thought, "samples": args.samples} if args.chain_of_thought else {}
        if args.json:
            print(json.dumps({"data": spec, "model": args.model, **mode, **result}))
        else:
            how = f", chain-of-thought ({args.samples} sample(s))" if args.chain_of_thought else ""
            print(f"{spec}: {result['n']} questions{how}, accuracy {result['accuracy']:.4f}, mean P(correct) "
                  f"{result['mean_correct_prob']:.4f}, {result['seconds']:.1f} s")
    return 0


def _eval_pm(args) -> int:
    import torch

    from .data import load_eval_comparisons
    from .evals import pm_comparison_accuracy
    from .reward import load_reward_model

    if args.threads:
        torch.set_num_threads(args.threads)
    comparisons = load_eval_comparisons(args.data, limit=args.limit)
    pm = load_reward_model(args.model, device=args.device, dtype=args.dtype)
    result = pm_comparison_accuracy(pm, comparisons, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"data": args.data, "model": args.model, **result}))
    else:
        print(f"{args.data}: {result['n']} comparisons, preference-model accuracy {result['accuracy']:.4f}, "
              f"{result['seconds']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return _eval_pm(args) if args.eval_command == "pm" else _eval_mc(args)
    from .config import load_config
    from .rundir import RunDir

    if args.command == "report":
        import yaml

        from .config import config_from_dict
        from .report import write_report

        run = RunDir(args.out)
        config = config_from_dict(yaml.safe_load((run.root / "config.yaml").read_text(encoding="utf-8")))
        print(write_report(run, config))
        return 0
    from .run import open_run, run_all, run_stage

    config = load_config(args.config, args.overrides)
    engine, engine_options = _engine(args)
    if args.command == "run":
        report = run_all(config, args.out, progress=not args.no_progress, engine=engine, engine_options=engine_options)
        print(f"[cai] report: {report}")
        return 0
    stage = args.command.replace("-", "_")
    ctx = open_run(config, args.out, progress=not args.no_progress, engine=engine, engine_options=engine_options)
    run_stage(stage, config, ctx, input_path=getattr(args, "input", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
