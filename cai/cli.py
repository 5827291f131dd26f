"""`cai`: the command line over the library.

    cai run --config tiny --out runs/demo          every stage in order (finished ones skipped, a killed one resumed)
    cai <stage> --config tiny --out runs/demo      one stage: critique-revise, sft, sample-pairs, label, train-pm,
                                                   ppo, evaluate (reads the previous stage's dataset, or --input)
    cai eval mc --data FILE.jsonl [--model M] [--limit N] [--json]
    cai report --out runs/demo                     rewrite report.md from a run folder
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import STAGES, preset_names


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set label.principles=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="The Constitutional AI loop on cai_kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_args(sub.add_parser("run", help="run every stage in order, then write report.md"))
    for stage in STAGES:
        p = sub.add_parser(stage.replace("_", "-"), help=f"run the {stage} stage in a run folder")
        _add_run_args(p)
        if stage != "evaluate":
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
    return parser


def _eval_mc(args) -> int:
    import torch

    from .data import load_mc_questions
    from .evals import mc_eval
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_mc_questions(args.data, limit=args.limit)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, allow_download=args.allow_download)
    result = mc_eval(model, tokenizer, questions, max_batch_tokens=args.batch_tokens, progress=not args.json)
    if args.json:
        print(json.dumps({"data": args.data, "model": args.model, **result}))
    else:
        print(f"{args.data}: {result['n']} questions, accuracy {result['accuracy']:.4f}, mean P(correct) "
              f"{result['mean_correct_prob']:.4f}, {result['seconds']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return _eval_mc(args)
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
    if args.command == "run":
        report = run_all(config, args.out, progress=not args.no_progress)
        print(f"[cai] report: {report}")
        return 0
    stage = args.command.replace("-", "_")
    ctx = open_run(config, args.out, progress=not args.no_progress)
    run_stage(stage, config, ctx, input_path=getattr(args, "input", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
