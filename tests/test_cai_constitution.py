"""The constitution loader: our YAML (validated entry by entry) and the paper's published JSON format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from cai.constitution import (DEFAULT_PATH, ConstitutionError, Turn, load_constitution, parse_constitution,
                              parse_raw_transcript)
from cai.data import paper_data_dir

PAPER = paper_data_dir()
needs_paper = pytest.mark.skipif(PAPER is None, reason="the paper's published data folder is not on this machine")


def _default_data():
    return yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))


def _write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_default_constitution_covers_the_papers_categories():
    c = load_constitution("default")
    assert len(c.critique_principles) >= 16 and len(c.choice_principles) >= 16
    assert len({p.id for p in c.critique_principles}) == len(c.critique_principles)
    assert len({p.id for p in c.choice_principles}) == len(c.choice_principles)
    text = " ".join(p.critique + p.revision for p in c.critique_principles).lower()
    for word in ("harm", "unethical", "racis", "sexis", "toxic", "dangerous", "law", "preachy", "child"):
        assert word in text, word
    assert c.critique_examples and c.label_examples and c.cot_label_examples
    # held-out judge questions for both criteria, none of them a training (choice) principle
    assert c.judge_questions("harmless") and c.judge_questions("helpful")
    assert not {p.id for p in c.judge_principles} & {p.id for p in c.choice_principles}
    assert not {p.text for p in c.judge_principles} & {p.text for p in c.choice_principles}
    example = c.critique_examples[0]
    assert [t.role for t in example.turns()][-4:] == ["critique_request", "critique", "revision_request", "revision"]
    # an example's requests are those of the principle it names
    principle = c.critique_principle(_default_data()["critique_revision_examples"][0]["principle"])
    assert example.critique_request == principle.critique and example.revision_request == principle.revision


@needs_paper
def test_default_constitution_is_in_our_own_words():
    """No sentence of the paper's instructions appears in ours."""
    ours = DEFAULT_PATH.read_text(encoding="utf-8").lower()
    theirs = load_constitution(PAPER)
    for p in theirs.critique_principles:
        for sentence in (p.critique + " " + p.revision).split("."):
            sentence = " ".join(sentence.lower().split())
            assert len(sentence) < 40 or sentence not in " ".join(ours.split())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["critique_revision"][2].pop("revision"), "critique_revision[2] (id 'ethics'): missing field 'revision'"),
    (lambda d: d["choice"][1].update(text="   "), "choice[1] (id 'least-harmful-overall'): field 'text' must be non-empty"),
    (lambda d: d["choice"][3].update(id="harmless-ethical"), "choice[3] (id 'harmless-ethical'): duplicate id"),
    (lambda d: d["critique_revision"][0].update(extra="x"), "critique_revision[0] (id 'harm-broad'): unknown field"),
    (lambda d: d.pop("choice"), "missing section 'choice'"),
    (lambda d: d.update(choices=[]), "unknown top-level key"),
    (lambda d: d["critique_revision_examples"][0].update(principle="nope"), "principle 'nope' is not an id"),
    (lambda d: d["labeling_examples"][1]["conversation"].insert(0, {"assistant": "hi"}),
     "labeling_examples[1] (id 'splinter'): conversation[0] should be 'human'"),
    (lambda d: d["judge"][0].update(criterion="honest"), "judge[0] (id 'judge-less-harm'): criterion must be one of"),
    (lambda d: d["judge"][1].update(id="safe"), "judge principle id(s) ['safe'] are also choice principles"),
    (lambda d: d["labeling_examples"][0].update(chosen=""), "labeling_examples[0] (id 'bank-teller'): field 'chosen'"),
])
def test_validation_errors_name_the_file_and_the_entry(tmp_path, mutate, message):
    data = copy.deepcopy(_default_data())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_only_safe_yaml(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        load_constitution(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConstitutionError, match="no such constitution"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(ConstitutionError, match="top level must be a mapping"):
        parse_constitution(["a"], source="x.yaml")


def test_raw_transcript_parsing():
    turns = parse_raw_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nCritiqueRequest: why?\n\nCritique: because"
                                 "\n\nHuman:")
    assert turns == (Turn("human", "hi there"), Turn("assistant", "hello"), Turn("critique_request", "why?"),
                     Turn("critique", "because"))
    with pytest.raises(ConstitutionError):
        parse_raw_transcript("no labels here")


@needs_paper
def test_paper_format_loads():
    c = load_constitution(PAPER)
    assert len(c.critique_principles) == 16 and len(c.choice_principles) == 16
    assert all(p.critique and p.revision and "Request" not in p.critique for p in c.critique_principles)
    assert all(not p.text.endswith("Options:") for p in c.choice_principles)
    assert len(c.critique_examples) == 5 and all(e.conversation[0].role == "human" for e in c.critique_examples)
    assert len(c.label_examples) == 5 and all(e.chosen and e.rejected for e in c.label_examples)
    assert c.cot_label_examples and all("{}" in e.raw for e in c.cot_label_examples)


def test_paper_format_errors(tmp_path):
    with pytest.raises(ConstitutionError, match="CritiqueRevisionInstructions.json: missing"):
        load_constitution(tmp_path)
    (tmp_path / "CritiqueRevisionInstructions.json").write_text(json.dumps({"x": {"prompt": ["oops"],
                                                                                 "edit_request": "oops"}}))
    with pytest.raises(ConstitutionError, match="entry 'x'"):
        load_constitution(tmp_path)
