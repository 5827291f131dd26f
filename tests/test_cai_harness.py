"""The lm-evaluation-harness backend (`--model cai`) against lm-eval's own `hf` backend, request by request:
log-likelihoods to 1e-4 and is_greedy equal, on local tasks (the paper's HHH file, multi-token choices of
different lengths, few-shot examples, a chat template), on loglikelihood_rolling, truncation and empty contexts.
A tiny random model; lm-eval from PyPI (the `harness` extra)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from cai.data import paper_data_dir
from cai_helpers import _one_thread, require_ops, tiny_model_dir  # noqa: F401 (fixtures)

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the `harness` extra)")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from cai.harness import CaiLM, write_mc_task  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _ops():
    require_ops("choice_logprobs")


def _models(folder, **kwargs):
    kwargs = {"device": "cpu", "dtype": "float32", **kwargs}
    return HFLM(pretrained=str(folder), **kwargs), CaiLM(pretrained=str(folder), **kwargs)


def _assert_same(hf_answers, cai_answers):
    assert len(hf_answers) == len(cai_answers)
    for hf, ours in zip(hf_answers, cai_answers):
        assert abs(hf[0] - ours[0]) <= TOLERANCE, (hf, ours)
        assert hf[1] == ours[1], (hf, ours)


def _evaluate(lm, tasks, folder, **kwargs):
    """{task: [[(loglikelihood, is_greedy) per choice] per doc]} and the results table, via simple_evaluate."""
    # include_defaults=False: indexing lm-eval's thousands of built-in task files takes ~10 s a run
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                  log_samples=True, verbosity="WARNING", **kwargs)
    answers = {task: [[tuple(r[0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
               for task, samples in out["samples"].items()}
    return answers, out["results"]


def _write_task(folder, name, docs, **extra):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
              "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
              "metric_list": [{"metric": "acc"}], "metadata": {"version": 1.0}, **extra}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


CHOICE_DOCS = [  # choices of 1 to many tokens, sharing leading words, one a prefix of another
    {"question": "Which color is the sky on a clear day?", "choices": ["blue", "a shade of green", "red", "blue-ish"],
     "answer": 0},
    {"question": "Pick a kind reply. The answer is:", "choices": ["(A) go away", "(B) happy to help, of course",
                                                                   "(B) happy"], "answer": 1},
    {"question": "Short", "choices": ["yes", "no"], "answer": 0},
    {"question": "Which reply is kinder?\nOptions:\n(A) go away\n(B) happy to help\nThe answer is:",
     "choices": ["(A)", "(B)", "(A) go away", "neither of the two options, since both are quite rude"], "answer": 1},
    {"question": "Which reply is kinder?\nOptions:\n(A) no\n(B) yes\nThe answer is:", "choices": ["(A)", "(B)"],
     "answer": 1},
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_multi_token_choices_match_hf(tiny_model_dir, tmp_path, batch_size):
    _write_task(tmp_path, "choices", CHOICE_DOCS)
    hf, ours = _models(tiny_model_dir, batch_size=batch_size)
    hf_answers, hf_results = _evaluate(hf, ["choices"], tmp_path)
    cai_answers, cai_results = _evaluate(ours, ["choices"], tmp_path)
    assert [len(d) for d in cai_answers["choices"]] == [len(d["choices"]) for d in CHOICE_DOCS]
    _assert_same([a for doc in hf_answers["choices"] for a in doc], [a for doc in cai_answers["choices"] for a in doc])
    assert hf_results["choices"]["acc,none"] == cai_results["choices"]["acc,none"]


@pytest.mark.parametrize("sampler", ["first_n", "default"])
def test_few_shot_examples_match_hf(tiny_model_dir, tmp_path, sampler):
    """Few-shot examples (the same ones in every context with first_n, drawn per document by default) in
    front of each question; two tasks in one run (each gets its own prefix tree)."""
    _write_task(tmp_path, "fewshot", CHOICE_DOCS, fewshot_split="test", fewshot_config={"sampler": sampler})
    _write_task(tmp_path, "plain", CHOICE_DOCS[:3])
    hf, ours = _models(tiny_model_dir, batch_size=2)
    kwargs = {"num_fewshot": 2, "random_seed": 0, "numpy_random_seed": 0, "fewshot_random_seed": 1234}
    hf_answers, _ = _evaluate(hf, ["fewshot", "plain"], tmp_path, **kwargs)
    cai_answers, _ = _evaluate(ours, ["fewshot", "plain"], tmp_path, **kwargs)
    for task in ("fewshot", "plain"):
        _assert_same([a for doc in hf_answers[task] for a in doc], [a for doc in cai_answers[task] for a in doc])


def test_chat_template_matches_hf(tiny_model_dir, tmp_path):
    _write_task(tmp_path, "chat", CHOICE_DOCS[:3])
    hf, ours = _models(tiny_model_dir, batch_size=2)
    hf_answers, _ = _evaluate(hf, ["chat"], tmp_path, apply_chat_template=True)
    cai_answers, _ = _evaluate(ours, ["chat"], tmp_path, apply_chat_template=True)
    _assert_same([a for doc in hf_answers["chat"] for a in doc], [a for doc in cai_answers["chat"] for a in doc])


@pytest.mark.skipif(paper_data_dir() is None, reason="the paper's published data folder is not on this machine")
def test_hhh_file_as_a_local_task_matches_hf(tiny_model_dir, tmp_path):
    """write_mc_task points lm-eval at the paper's file (not copied); lm-eval's acc is cai eval mc's accuracy."""
    write_mc_task("paper:438HHHEvaluations.jsonl", tmp_path, name="hhh")
    assert str(paper_data_dir()) in (tmp_path / "hhh.yaml").read_text()
    hf, ours = _models(tiny_model_dir, batch_size=4)
    hf_answers, hf_results = _evaluate(hf, ["hhh"], tmp_path, limit=16)
    cai_answers, cai_results = _evaluate(ours, ["hhh"], tmp_path, limit=16)
    _assert_same([a for doc in hf_answers["hhh"] for a in doc], [a for doc in cai_answers["hhh"] for a in doc])
    assert hf_results["hhh"]["acc,none"] == cai_results["hhh"]["acc,none"]
    from cai.data import load_mc_questions
    from cai.evals import mc_eval
    mc = mc_eval(ours.model, ours.tokenizer, load_mc_questions("paper:438HHHEvaluations.jsonl", limit=16))
    assert mc["accuracy"] == cai_results["hhh"]["acc,none"]


def _instances(kind, arguments, task="t"):
    return [Instance(kind, {}, args, idx=i, metadata=(task, i, 1)) for i, args in enumerate(arguments)]


def _greedy_requests(lm, contexts):
    """(context, continuation) pairs whose continuation is the model's own greedy text, and one that is not."""
    pairs = []
    for context in contexts:
        ids = lm.tok_encode(context)
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)[0, len(ids):].tolist()
        text = lm.tokenizer.decode(out)
        if lm.tok_encode(context + text)[len(ids):] == out:  # re-tokenizes to the same tokens: a greedy request
            pairs.append((context, text))
        pairs.append((context, " and then"))
    return pairs


def test_loglikelihood_edge_cases_match_hf(tiny_model_dir):
    """Empty contexts (the prefix token), contexts cut on the left at max_length, greedy continuations, a
    trailing space moved into the continuation, batch sizes 1 and 'auto'."""
    for kwargs in ({"batch_size": 1, "max_length": 40}, {"batch_size": "auto", "max_batch_size": 4, "max_length": 64}):
        hf, ours = _models(tiny_model_dir, **kwargs)
        pairs = [("", "The answer is"), ("", " yes"), ("Question: a context long enough to be cut on the left when "
                                                      "the model's window is small. Answer: ", "yes"),
                 ("Question: a context long enough to be cut on the left when the model's window is small. Answer:",
                  " a longer continuation, so the cut differs")]
        pairs += _greedy_requests(hf, ["The answer is", "Human: hello"])
        requests = _instances("loglikelihood", pairs)
        hf_answers, cai_answers = hf.loglikelihood(requests), ours.loglikelihood(requests)
        _assert_same(hf_answers, cai_answers)
        assert any(greedy for _, greedy in cai_answers), "no greedy request exercised"
        assert ours.fallback_reason() is None


def test_loglikelihood_rolling_matches_hf(tiny_model_dir):
    """Documents over several windows of max_length tokens, some windows sharing their one-token context."""
    hf, ours = _models(tiny_model_dir, batch_size=3, max_length=16)
    docs = ["Human: Please tell me a story about a cat who is kind to everyone. Assistant: Once upon a time.",
            "The answer is: (A). The answer is: (B).", "Short.",
            "Critique: the response was harmful. Revision: here is a kinder reply to the human."]
    requests = _instances("loglikelihood_rolling", [(d,) for d in docs])
    assert ours.loglikelihood_rolling(requests) == pytest.approx(hf.loglikelihood_rolling(requests), abs=TOLERANCE)


def test_fallback_when_logits_are_not_the_lm_head(tiny_model_dir, caplog):
    """A model whose logits are transformed after the LM head is scored by lm-eval's own code, with a warning."""
    hf, ours = _models(tiny_model_dir, batch_size=2)
    for lm in (hf, ours):
        head = lm.model.lm_head
        lm.model.lm_head = torch.nn.Sequential(head, torch.nn.Tanh())  # logit soft-capping, say
        lm.model.get_output_embeddings = lambda head=head: head
    with caplog.at_level(logging.WARNING, logger="cai.harness"):
        requests = _instances("loglikelihood", [("The answer is", " (A)"), ("The answer is", " (B)")])
        _assert_same(hf.loglikelihood(requests), ours.loglikelihood(requests))
    assert "log-probs from the LM head differ" in ours.fallback_reason()
    assert "lm-eval's own hf code" in caplog.text


@pytest.mark.slow  # lm-eval's CLI: ~40 s here
def test_registered_and_run_by_the_cli(tiny_model_dir, tmp_path, capsys):
    from lm_eval.api.registry import get_model

    from cai.cli import main as cai_main

    assert get_model("cai") is CaiLM and get_model("hf") is HFLM
    _write_task(tmp_path, "choices", CHOICE_DOCS)
    out = tmp_path / "out"
    assert cai_main(["eval", "harness", "--model", "cai", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
                     "--tasks", "choices", "--include_path", str(tmp_path), "--batch_size", "2",
                     "--output_path", str(out)]) == 0
    assert "choices" in capsys.readouterr().out
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["choices"]["acc,none"] >= 0
    assert cai_main(["eval", "harness", "--model", "cai", "--model_args", f"pretrained={tmp_path / 'none'}",
                     "--tasks", "choices", "--include_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: pretrained=")
