"""`cai eval mc` on bad input (issue 13): malformed rows named by line, limits, empty files, prompts longer
than the model's context (cut from the left with a warning, or refused)."""

from __future__ import annotations

import json
import shutil

import pytest

from cai import CaiWarning
from cai.cli import main as cai_main
from cai.continuations import score_continuations
from cai.data import load_mc_questions
from cai.evals import mc_eval
from cai.models import encode, generate, load_model
from cai.scoring import score_options, tokenize_questions
from cai_helpers import _one_thread, require_ops, tiny_model_dir  # noqa: F401 (fixtures)

GOOD = {"prompt": "Which reply is kinder? (A) go away (B) happy to help. The answer is:", "corrects": [" (B)"],
        "incorrects": [" (A)"]}


@pytest.fixture(autouse=True)
def _ops():
    require_ops("choice_logprobs")


def write(tmp_path, *rows, raw: str = "") -> str:
    path = tmp_path / "eval.jsonl"
    path.write_text(raw + "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_mc(model_dir, data, *extra) -> list[str]:
    return ["eval", "mc", "--data", data, "--model", str(model_dir), "--device", "cpu", *extra]


@pytest.mark.parametrize("row, message", [
    # issue 13: a string was split into characters and scored (accuracy 1.0)
    (dict(GOOD, corrects=" Yes"), "line 2: 'corrects' must be a non-empty list of option strings"),
    # issue 13: an empty prompt crashed in a reshape
    (dict(GOOD, prompt=""), "line 2: 'prompt' must be non-empty text; got ''"),
    ({"prompt": "Q?", "corrects": [" (A)"]}, "line 2: missing field(s) ['incorrects']"),
    (dict(GOOD, incorrects=[]), "line 2: 'incorrects' must be a non-empty list"),
    (dict(GOOD, incorrects=[" (A)", 3]), "line 2: 'incorrects' must hold non-empty strings; got 3"),
    (dict(GOOD, corrects=[""]), "line 2: 'corrects' must hold non-empty strings; got ''"),
    (["a", "list"], "line 2: expected a JSON object with prompt, corrects, incorrects"),
])
def test_malformed_rows_are_named_by_line(tiny_model_dir, tmp_path, capsys, row, message):
    data = write(tmp_path, GOOD, row)
    assert cai_main(eval_mc(tiny_model_dir, data)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data} {message}") and "Traceback" not in err and "accuracy" not in err


def test_a_line_that_is_not_json(tmp_path):
    data = write(tmp_path, GOOD, raw='{"prompt": "cut in the mid\n')
    with pytest.raises(ValueError, match=f"{data} line 1: not valid JSON"):
        load_mc_questions(data)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_is_an_error(tiny_model_dir, tmp_path, capsys, limit):
    """Issue 13: --limit 0 and --limit -1 scored one question; a limit counts questions, so it is >= 1."""
    with pytest.raises(SystemExit) as exit_:
        cai_main(eval_mc(tiny_model_dir, write(tmp_path, GOOD, GOOD), "--limit", limit))
    assert exit_.value.code == 2 and f"argument --limit: must be >= 1; got {limit}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_mc_questions(write(tmp_path, GOOD), limit=int(limit))


def test_limit_takes_the_first_questions(tmp_path):
    rows = [dict(GOOD, prompt=f"Question {i}. The answer is:") for i in range(5)]
    assert [q.prompt for q in load_mc_questions(write(tmp_path, *rows), limit=2)] == [r["prompt"] for r in rows[:2]]


def test_an_empty_file_is_an_error(tiny_model_dir, tmp_path, capsys):
    """Issue 13: an empty file gave `accuracy: NaN` and exit 0."""
    data = write(tmp_path, raw="\n")
    assert cai_main(eval_mc(tiny_model_dir, data, "--json")) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {data}: no questions (the file has no rows)\n"
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="no questions"):
        mc_eval(model, tokenizer, [])


LONG = "Tell me about the weather and the sea and the ships and everything else there is. " * 3


def test_prompt_longer_than_the_context_is_cut_from_the_left(tiny_model_dir):
    """Issue 13: a prompt past the model's context ran on without a word."""
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    prompts = [LONG + "The answer is:", "Short. The answer is:", LONG + LONG + "The answer is:"]
    options = [[" (A)", " (B) and more words"]] * 3
    prompt_ids, option_ids = tokenize_questions(tokenizer, prompts, options)
    context = 40
    assert len(prompt_ids[0]) > context and len(prompt_ids[1]) < context - 4
    model.config.max_position_embeddings = context
    with pytest.warns(CaiWarning, match=f"2 of 3 prompts were longer than fits in the model's context of {context}"):
        cut = score_options(model, tokenizer, prompts, options)
    room = context - (max(len(o) for o in option_ids[0]) - 1)
    for q in range(3):  # each scored as its last `room` tokens, the options unchanged
        expected = score_continuations(model, tokenizer.pad_token_id, [prompt_ids[q][-room:]], [option_ids[q]])
        assert cut.probs[q] == pytest.approx(expected.probs[0], abs=1e-6)
    with pytest.raises(ValueError, match=f"multiple-choice scoring: 2 of 3 prompts do not fit in the model's context "
                                         f"of {context} tokens"):
        score_options(model, tokenizer, prompts, options, overflow="error")
    model.config.max_position_embeddings = 4
    with pytest.raises(ValueError, match="already fills the model's context of 4 tokens"):
        score_options(model, tokenizer, prompts, options)


def test_generation_prompt_longer_than_the_context(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    model.config.max_position_embeddings = 48
    with pytest.warns(CaiWarning, match="generation \\(max_new_tokens 8\\): 1 of 2 prompts were longer"):
        texts = generate(model, tokenizer, [LONG, "Hello?"], max_new_tokens=8, temperature=0.0)
    assert len(texts) == 2
    # the cut prompt generates what its last 40 tokens generate
    tail = tokenizer.decode(encode(tokenizer, LONG)[-40:])
    assert encode(tokenizer, tail) == encode(tokenizer, LONG)[-40:]
    assert generate(model, tokenizer, [tail], max_new_tokens=8, temperature=0.0) == texts[:1]
    with pytest.raises(ValueError, match="do not fit"):
        generate(model, tokenizer, [LONG], max_new_tokens=8, overflow="error")


def test_cli_overflow_option(tiny_model_dir, tmp_path, capsys):
    small = tmp_path / "small-context"
    shutil.copytree(tiny_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=64)))
    data = write(tmp_path, GOOD, dict(GOOD, prompt=LONG + "The answer is:"))
    assert cai_main(eval_mc(small, data, "--json")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 2
    assert captured.err.startswith("warning: multiple-choice scoring: 1 of 2 prompts were longer than fits in the "
                                   "model's context of 64 tokens and were cut from the left")
    assert cai_main(eval_mc(small, data, "--overflow", "error")) == 1
    assert "error: multiple-choice scoring: 1 of 2 prompts do not fit" in capsys.readouterr().err


def test_preference_model_dialogues_stay_within_the_context(tiny_model_dir):
    from cai.reward import RewardModel

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    pm = RewardModel(model, tokenizer)
    ids, _ = pm.encode([LONG], ["A long answer. " * 30], max_length=1024)
    assert ids.shape[1] > 40
    model.config.max_position_embeddings = 40
    ids, mask = pm.encode([LONG], ["A long answer. " * 30], max_length=1024)
    assert ids.shape[1] == 40 and int(mask.sum()) == 40


def test_scorer_refuses_a_prompt_of_no_tokens(tiny_model_dir):
    """The scorer itself (not only the file check): an empty prompt has no position to predict an option from
    (issue 13: a crash in a reshape)."""
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    assert encode(tokenizer, "") == []
    with pytest.raises(ValueError, match="question 1: the prompt '' encodes to no tokens"):
        score_options(model, tokenizer, ["Fine. The answer is:", ""], [[" (A)", " (B)"]] * 2)
