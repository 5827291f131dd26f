"""The batched multiple-choice scorer against the naive one (one full forward per option, float64)."""

from __future__ import annotations

import json

import pytest

from cai.cli import main as cai_main
from cai.data import MCQuestion, load_mc_questions
from cai.evals import mc_eval
from cai.models import load_model
from cai.scoring import score_options
from cai_helpers import _one_thread, require_ops, tiny_model_dir, tiny_raw_model_dir  # noqa: F401 (fixtures)
from naive_mc import naive_mc_eval, naive_option_logprobs, normalize

NINE = [" (A)", " (B)", " (C)", " (D)", " (E)", " (F)", " (G)", " (H)", " (I)"]
QUESTIONS = [
    ("Which reply is kinder?\nOptions:\n(A) go away\n(B) happy to help\nThe answer is:", [" (B)", " (A)"]),
    ("Pick a color. The answer is:", [" red", " a shade of blue-green", " none of these, really", " x"]),
    ("Nine options follow, which one is best? The answer is:", NINE),
    ("Short", [" yes", " no"]),
    ("A prompt that is quite a bit longer than the others, so that it needs left padding in its batch, and more. "
     "The answer is:", [" (A) the first option, spelled out at length", " (B)"]),
]


@pytest.fixture(autouse=True)
def _ops():
    require_ops("choice_logprobs")


def _max_diff(a, b):
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


@pytest.mark.parametrize("max_batch_tokens", [1, 64, 100_000])
def test_matches_naive_scorer(tiny_model_dir, max_batch_tokens):
    model, tok = load_model(tiny_model_dir, device="cpu")
    prompts, options = zip(*QUESTIONS)
    fast = score_options(model, tok, list(prompts), [list(o) for o in options], max_batch_tokens=max_batch_tokens)
    naive_lp = [naive_option_logprobs(model, tok, p, list(o)) for p, o in QUESTIONS]
    assert [len(p) for p in fast.probs] == [len(o) for o in options]
    assert _max_diff(fast.logprobs, naive_lp) < 1e-3
    assert _max_diff(fast.probs, [normalize(lp) for lp in naive_lp]) < 1e-5
    assert all(abs(sum(p) - 1) < 1e-5 for p in fast.probs)


def test_shared_prefix_gives_the_same_scores(tiny_raw_model_dir):
    model, tok = load_model(tiny_raw_model_dir, device="cpu")
    # the prefix ends where the tokenizer splits anyway, so prefix and rest encode as the whole prompt does
    prefix = "Example question. The answer is: (A)."
    prompts = [prefix + " " + p for p, _ in QUESTIONS]
    options = [o for _, o in QUESTIONS]
    shared = score_options(model, tok, prompts, options, prefix=prefix, max_batch_tokens=64)
    naive = []
    for p, o in zip(prompts, options):
        naive.append(normalize(naive_option_logprobs(model, tok, p, o)))
    assert _max_diff(shared.probs, naive) < 1e-4


def test_temperature_and_clamp(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    prompts, options = [QUESTIONS[0][0]] * 2, [QUESTIONS[0][1]] * 2
    hot = score_options(model, tok, prompts, options, temperature=2.0)
    cold = score_options(model, tok, prompts, options)
    assert hot.probs != cold.probs
    clamped = score_options(model, tok, prompts, options, clamp=(0.4, 0.6))
    assert all(0.4 - 1e-6 <= p <= 0.6 + 1e-6 for row in clamped.probs for p in row)


def test_bad_questions(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="no options"):
        score_options(model, tok, ["x"], [[]])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_options(model, tok, ["x"], [[" a", ""]])
    with pytest.raises(ValueError, match="same length"):
        score_options(model, tok, ["x", "y"], [[" a"]])


def test_mc_eval_and_cli_json(tiny_model_dir, tmp_path, capsys):
    """Any number of options (9 included), options of several tokens, several correct options."""
    path = tmp_path / "eval.jsonl"
    rows = [{"prompt": QUESTIONS[2][0], "corrects": [" (E)"], "incorrects": [o for o in NINE if o != " (E)"]},
            {"prompt": QUESTIONS[1][0], "corrects": [" red", " x"], "incorrects": [" a shade of blue-green"]},
            {"prompt": QUESTIONS[0][0], "corrects": [" (B)"], "incorrects": [" (A)"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_mc_questions(str(path))
    assert questions[1] == MCQuestion(QUESTIONS[1][0], (" red", " x", " a shade of blue-green"), 2)
    model, tok = load_model(tiny_model_dir, device="cpu")
    naive = naive_mc_eval(model, tok, questions)
    assert cai_main(["eval", "mc", "--data", str(path), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and abs(result["accuracy"] - naive["accuracy"]) < 1e-12
    assert _max_diff(result["probs"], naive["probs"]) < 1e-5
    assert [len(p) for p in result["probs"]] == [9, 3, 2]
    direct = mc_eval(model, tok, questions)
    assert direct["accuracy"] == result["accuracy"]
    assert cai_main(["eval", "mc", "--data", str(path), "--model", str(tiny_model_dir), "--limit", "1"]) == 0
    assert "1 questions, accuracy" in capsys.readouterr().out
