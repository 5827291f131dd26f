"""`cai`: the command line over the library.

    cai run --config tiny --out runs/demo          every stage in order (finished ones skipped, a killed one resumed)
    cai <stage> --config tiny --out runs/demo      one stage: critique-revise, sft, sample-pairs, label, train-pm,
                                                   ppo, evaluate (reads the previous stage's dataset, or --input)
    cai label --engine ray [--ray-address A]      a batch stage (critique-revise, sample-pairs, label) on a Ray
                                                   actor pool, one model per actor; the same rows as --engine local
    torchrun --nproc_per_node N -m cai.cli sft ... a training stage (sft, train-pm, ppo) data-parallel over N ranks
    cai eval mc --data FILE.jsonl [--model M] [--limit N] [--json]
    cai eval harness --model cai --model_args pretrained=embedded --tasks T ...   lm-eval's own CLI, `cai` model added
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

from .config import STAGES, preset_names


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set label.principles=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# stages whose batches can run on a Ray actor pool (`--engine ray`, cai.scaleout.ray_engine)
RAY_STAGES = ("critique_revise", "sample_pairs", "label")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help=f"run the batches of {', '.join(s.replace('_', '-') for s in RAY_STAGES)} in this process "
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
        p = sub.add_parser(stage.replace("_", "-"), help=f"run the {stage} stage in a run folder")
        _add_run_args(p)
        if stage in RAY_STAGES:
            _add_engine_args(p)
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
    # parsed by lm-eval (main() hands everything after `eval harness` to it); listed here for --help
    evals.add_parser("harness", add_help=False,
                     help="lm-evaluation-harness's CLI with the batched scorer registered as --model cai "
                          "(every lm-eval flag; needs the [harness] extra)")
    return parser


def _eval_harness(argv: list[str]) -> int:
    """lm-eval's own CLI (`lm-eval run ...`) with the `cai` model registered; lm-eval 0.4 finds no plugins."""
    try:
        from lm_eval.__main__ import cli_evaluate

        from . import harness  # noqa: F401  registers --model cai
    except ImportError as err:
        print(f"error: `cai eval harness` needs lm-evaluation-harness ({err}); "
              f"pip install 'cai-kernels[harness]'", file=sys.stderr)
        return 2
    from .models import ModelNotFoundError

    saved, sys.argv = sys.argv, ["cai eval harness", *argv]
    try:
        cli_evaluate()
    except (ModelNotFoundError, OSError, ValueError, KeyError) as err:  # OSError: a model path or id not found
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "harness"]:
        return _eval_harness(argv[2:])
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
