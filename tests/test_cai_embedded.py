"""End to end on the embedded SmolLM2-135M-Instruct (slow): `cai eval mc` on the paper's HHH questions
agrees with the naive scorer (probabilities to 1e-4, same accuracy)."""

from __future__ import annotations

import json
import time

import pytest

from cai.cli import main as cai_main
from cai.data import load_mc_questions, paper_data_dir
from cai.models import load_model
from cai_helpers import _one_thread, require_ops  # noqa: F401 (fixture)
from naive_mc import naive_mc_eval

pytestmark = pytest.mark.slow


@pytest.mark.skipif(paper_data_dir() is None, reason="the paper's published data folder is not on this machine")
def test_eval_mc_on_hhh_matches_naive(capsys):
    require_ops("choice_logprobs")
    limit = 6
    assert cai_main(["eval", "mc", "--data", "paper:438HHHEvaluations.jsonl", "--limit", str(limit), "--json",
                     "--threads", "1"]) == 0
    fast = json.loads(capsys.readouterr().out)
    model, tokenizer = load_model("embedded", device="cpu", dtype="float32")
    start = time.perf_counter()
    naive = naive_mc_eval(model, tokenizer, load_mc_questions("paper:438HHHEvaluations.jsonl", limit=limit))
    naive_seconds = time.perf_counter() - start
    assert fast["n"] == naive["n"] == limit
    assert fast["accuracy"] == naive["accuracy"]
    diff = max(abs(a - b) for p, q in zip(fast["probs"], naive["probs"]) for a, b in zip(p, q))
    assert diff < 1e-4
    print(f"\n{limit} HHH questions: batched {fast['seconds']:.1f} s, naive {naive_seconds:.1f} s, "
          f"max |dp| {diff:.2e}")


@pytest.mark.skipif(paper_data_dir() is None, reason="the paper's published data folder is not on this machine")
def test_eval_mc_chain_of_thought_on_hhh(capsys):
    """The embedded model reasons in the Human/Assistant format before answering two HHH questions."""
    require_ops("choice_logprobs")
    assert cai_main(["eval", "mc", "--data", "paper:438HHHEvaluations.jsonl", "--limit", "2", "--json", "--threads",
                     "1", "--chain-of-thought", "--few-shot", "1", "--max-new-tokens", "24"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["chain_of_thought"] and result["samples"] == 1
    # greedy reasoning; cut where the model starts the answer itself (it may do so at once: an empty reasoning)
    assert any(text.strip() for text in result["reasoning"])
    assert not any(stop in text for text in result["reasoning"] for stop in ("The answer is", "\n\nHuman:"))
    assert all(abs(sum(p) - 1.0) < 1e-5 for p in result["probs"])


@pytest.mark.skipif(paper_data_dir() is None, reason="the paper's published data folder is not on this machine")
def test_harness_backend_on_hhh_matches_hf(tmp_path):
    """`--model cai` against lm-eval's hf on the embedded model, the HHH file as a local task: the same
    per-request log-likelihoods (1e-4) and is_greedy, the same accuracy."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the `harness` extra)")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from cai.harness import CaiLM, write_mc_task

    require_ops("choice_logprobs")
    write_mc_task("paper:438HHHEvaluations.jsonl", tmp_path, name="hhh")
    model, tokenizer = load_model("embedded", device="cpu", dtype="float32")
    answers, accuracy = {}, {}
    for name, lm in (("hf", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)),
                     ("cai", CaiLM(pretrained=model, tokenizer=tokenizer, batch_size=2))):
        out = lm_eval.simple_evaluate(model=lm, tasks=["hhh"], limit=6, log_samples=True, verbosity="WARNING",
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
        answers[name] = [r[0] for s in sorted(out["samples"]["hhh"], key=lambda s: s["doc_id"]) for r in s["resps"]]
        accuracy[name] = out["results"]["hhh"]["acc,none"]
    assert len(answers["cai"]) == 12 and accuracy["cai"] == accuracy["hf"]
    assert max(abs(a[0] - b[0]) for a, b in zip(answers["hf"], answers["cai"])) <= 1e-4
    assert [a[1] for a in answers["hf"]] == [b[1] for b in answers["cai"]]
