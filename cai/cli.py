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
    cai eval harness --model cai --model_args pretrained=embedded --tasks T ...   lm-eval's own CLI, `cai` model added
    cai report --out runs/demo                     rewrite report.md from a run folder

Errors are `error: ...` lines on stderr and a non-zero exit (1; 2 for a bad command line), with no traceback
unless --debug (or CAI_DEBUG=1). Warnings are `warning: ...` lines. With allow_download false (the default)
the hub libraries are switched offline before any of them is imported: not a single network request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# OpenMP threads that spin while waiting cost several times their work when the cores are shared (measured
# here: 6x slower generation with 2 spinning threads on a busy 2-core box); set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import CaiWarning
from .config import OVERFLOW, preset_names
from .stages import STAGES


def _number(kind, *, low: float, low_open: bool = False):
    """An argparse type: a `kind` (int / float) >= low (> low with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}; got {text}")
        return value
    return parse


def _folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give the run folder")
    return text


def _add_debug(p: argparse.ArgumentParser, top: bool = False) -> None:
    # on the top-level parser and on every command (so `cai run ... --debug` works too)
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the traceback of an error (also CAI_DEBUG=1)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--out", required=True, type=_folder, help="the run folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set label.principles_per_comparison=4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--repair", action="store_true",
                   help="redo what is damaged in the run folder (shards, checkpoints, finished stages' datasets) "
                        "instead of stopping with an error")
    _add_debug(p)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    ray_stages = ", ".join(s.name.replace("_", "-") for s in STAGES if s.scale_out == "ray")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help=f"run the batches of {ray_stages} in this process "
                        "or on a Ray actor pool (one model per actor; identical rows)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")
    p.add_argument("--actors", type=_number(int, low=1),
                   help="Ray actor-pool size (default: what the cluster's GPUs / CPUs allow)")
    p.add_argument("--cpus-per-actor", type=_number(float, low=0, low_open=True),
                   help="CPUs (and torch threads) per actor (default 1)")
    p.add_argument("--gpus-per-actor", type=_number(float, low=0),
                   help="GPUs per actor (default 1 if the cluster has GPUs)")


def _engine(args) -> tuple[str, dict]:
    options = {"address": getattr(args, "ray_address", None), "actors": getattr(args, "actors", None),
               "cpus_per_actor": getattr(args, "cpus_per_actor", None),
               "gpus_per_actor": getattr(args, "gpus_per_actor", None)}
    return getattr(args, "engine", "local"), {k: v for k, v in options.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="The Constitutional AI loop on cai_kernels.")
    _add_debug(parser, top=True)
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
    report.add_argument("--out", required=True, type=_folder)
    _add_debug(report)
    evals = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval_command", required=True)
    mc = evals.add_parser("mc", help="multiple-choice eval of a file in the paper's format "
                                     "(prompt, corrects, incorrects)")
    mc.add_argument("--data", required=True, help="a JSONL file, builtin:harmless_mc, or paper:NAME")
    mc.add_argument("--model", default="embedded", help="HF id, local folder, or 'embedded' (default)")
    mc.add_argument("--limit", type=_number(int, low=1), help="score only the first N questions (N >= 1)")
    mc.add_argument("--json", action="store_true", help="print one JSON object: n, accuracy, probs, ...")
    mc.add_argument("--batch-tokens", type=_number(int, low=1), default=2048, help="prompt tokens per forward batch")
    mc.add_argument("--threads", type=_number(int, low=1), help="torch CPU threads")
    mc.add_argument("--device", default="auto")
    mc.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    mc.add_argument("--overflow", choices=OVERFLOW, default="truncate-left",
                    help="prompts longer than the model's context: cut from the left (default; a warning counts "
                         "them) or an error")
    mc.add_argument("--allow-download", action="store_true", help="let the model be fetched from the Hub")
    _add_debug(mc)
    mc.add_argument("--chain-of-thought", action="store_true",
                    help="let the model reason first (the question as a Human/Assistant dialogue, 'Let's think step "
                         "by step:'), then score the options after 'So the answer is:'")
    mc.add_argument("--samples", type=_number(int, low=1), default=1,
                    help="with --chain-of-thought: reasoning samples per question (temperature 1), option "
                         "probabilities averaged; 1 = greedy reasoning (default)")
    mc.add_argument("--few-shot", type=_number(int, low=0), default=2,
                    help="with --chain-of-thought: worked chain-of-thought examples of our constitution in front")
    mc.add_argument("--max-new-tokens", type=_number(int, low=1), default=128,
                    help="with --chain-of-thought: reasoning length")
    mc.add_argument("--seed", type=int, default=0)
    pm = evals.add_parser("pm", help="a preference model on the comparisons of an eval file (the HHH questions' "
                                     "text_correct / text_incorrect transcripts)")
    pm.add_argument("--data", default="paper:438HHHEvaluations.jsonl", help="an eval file with text_correct / "
                                                                             "text_incorrect (default: the HHH evals)")
    pm.add_argument("--model", required=True, help="a preference model folder (a run's train_pm/model)")
    pm.add_argument("--limit", type=_number(int, low=1), help="the first N comparisons")
    pm.add_argument("--batch-size", type=_number(int, low=1), default=8)
    pm.add_argument("--json", action="store_true", help="print one JSON object: n, accuracy, rewards")
    pm.add_argument("--threads", type=_number(int, low=1), help="torch CPU threads")
    pm.add_argument("--device", default="auto")
    pm.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    _add_debug(pm)
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
    """Every eval file --data names (a file, or a folder / paper:* / a glob: each file of the eval format in it)."""
    from .offline import go_offline

    if not args.allow_download:
        go_offline()
    import torch

    from .data import eval_files, load_mc_questions
    from .evals import cot_fewshot, mc_eval, mc_eval_cot
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    files = eval_files([args.data])
    for spec, _, problem in files:
        if problem:
            warnings.warn(f"{spec}: skipped: {problem}", CaiWarning, stacklevel=1)
    specs = [spec for spec, _, problem in files if not problem]
    if not specs:
        raise ValueError(f"{args.data}: no file in the paper's eval format (prompt, corrects, incorrects)")
    questions = {spec: load_mc_questions(spec, limit=args.limit) for spec in specs}  # every file read first
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, allow_download=args.allow_download)
    fewshot = cot_fewshot(args.few_shot, seed=args.seed) if args.chain_of_thought else ""
    for spec in specs:
        if args.chain_of_thought:
            result = mc_eval_cot(model, tokenizer, questions[spec], samples=args.samples,
                                 max_new_tokens=args.max_new_tokens, fewshot=fewshot,
                                 max_batch_tokens=args.batch_tokens, seed=args.seed, overflow=args.overflow,
                                 progress=not args.json)
        else:
            result = mc_eval(model, tokenizer, questions[spec], max_batch_tokens=args.batch_tokens,
                             overflow=args.overflow, progress=not args.json)
        mode = {"chain_of_thought": args.chain_of_thought, "samples": args.samples} if args.chain_of_thought else {}
        if args.json:
            print(json.dumps({"data": spec, "model": args.model, **mode, **result}))
        else:
            how = f", chain-of-thought ({args.samples} sample(s))" if args.chain_of_thought else ""
            print(f"{spec}: {result['n']} questions{how}, accuracy {result['accuracy']:.4f}, mean P(correct) "
                  f"{result['mean_correct_prob']:.4f}, {result['seconds']:.1f} s")
    return 0


def _eval_pm(args) -> int:
    from .offline import go_offline

    go_offline()  # a preference model folder is local
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


def _report(args) -> int:
    from pathlib import Path

    import yaml

    from .config import config_from_dict
    from .offline import go_offline
    from .report import write_report
    from .rundir import RunDir

    go_offline()  # a report needs nothing from the network
    config_path = Path(args.out) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{args.out}: not a run folder (no config.yaml)")
    config = config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
    print(write_report(RunDir(args.out), config))
    return 0


def _dispatch(args) -> int:
    if args.command == "eval":
        return _eval_pm(args) if args.eval_command == "pm" else _eval_mc(args)
    if args.command == "report":
        return _report(args)
    from .config import load_config
    from .offline import go_offline

    config = load_config(args.config, args.overrides)  # every value checked before any work
    if not config.allow_download:
        go_offline()  # before transformers / datasets / huggingface_hub are imported
    from .run import open_run, run_all, run_stage

    engine, engine_options = _engine(args)
    common = {"progress": not args.no_progress, "engine": engine, "engine_options": engine_options,
              "repair": args.repair}
    if args.command == "run":
        report = run_all(config, args.out, **common)
        print(f"[cai] report: {report}")
        return 0
    stage = args.command.replace("-", "_")
    ctx = open_run(config, args.out, **common)
    run_stage(stage, config, ctx, input_path=getattr(args, "input", None))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, CaiWarning):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning


def _raised_here(err: BaseException) -> bool:
    """Whether `err` was raised by cai's own code (a message written for the user) rather than a library's."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(package + os.sep)


def error_lines(err: BaseException) -> list[str]:
    """The `error: ...` lines for an exception: its message line by line, then, for an error raised inside a
    library rather than by cai's own checks, a hint that --debug shows where it came from."""
    message = str(err).strip()
    if not message or not isinstance(err, (ValueError, TypeError, OSError, RuntimeError)):
        message = f"{type(err).__name__}: {message}" if message else type(err).__name__
    lines = [f"error: {line}" for line in message.splitlines()]
    return lines if _raised_here(err) else lines + ["error: (run with --debug to see the traceback)"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "harness"]:  # lm-eval parses its own flags
        return _eval_harness(argv[2:])
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CAI_DEBUG", "") not in ("", "0")
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print("\n".join(error_lines(err)), file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
