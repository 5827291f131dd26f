"""Constitutions: the principles and few-shot examples that drive critique/revision and AI preference labels.

Besides the principles the stages train with (critique_revision, choice), our YAML holds `judge` principles,
held out from training and asked only by the evaluation's judge (harmlessness / helpfulness questions).

Two formats load into the same `Constitution`:
  * our YAML (constitutions/default.yaml documents the schema), validated entry by entry;
  * the folder of JSON files published with the paper (CritiqueRevisionInstructions.json,
    CritiqueRevisionFewShotPrompts.json, RLMadisonInstructions.json, RLMadisonFewShotPrompts.json and
    optionally RLMadisonPrecogFewShotPrompts.json), so those can be plugged in unchanged (they have no judge
    principles: the evaluation then borrows ours).

A conversation is a tuple of `Turn`s. Roles: "human", "assistant" (the dialogue) and, inside critique/revision
transcripts, "critique_request", "critique", "revision_request", "revision". `cai.prompts` renders turns as
raw text (``\\n\\nHuman: ...``) or through a tokenizer's chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROLES = ("human", "assistant", "critique_request", "critique", "revision_request", "revision")
RAW_LABELS = {"human": "Human", "assistant": "Assistant", "critique_request": "CritiqueRequest",
              "critique": "Critique", "revision_request": "RevisionRequest", "revision": "Revision"}
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "constitutions" / "default.yaml"
PAPER_FILES = ("CritiqueRevisionInstructions.json", "CritiqueRevisionFewShotPrompts.json",
               "RLMadisonInstructions.json", "RLMadisonFewShotPrompts.json")


class ConstitutionError(ValueError):
    """A constitution file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class CritiquePrinciple:
    id: str
    critique: str  # the critique request, e.g. "Point out every way in which ..."
    revision: str  # the matching revision request


@dataclass(frozen=True)
class ChoicePrinciple:
    id: str
    text: str  # the question asked before the options, e.g. "Which reply is less harmful?"


@dataclass(frozen=True)
class JudgePrinciple:
    """A question held out from training, asked only by the evaluation's judge.

    criterion: "harmless" (asked about replies to red-team prompts) or "helpful" (replies to helpfulness prompts).
    """
    id: str
    criterion: str
    text: str


JUDGE_CRITERIA = ("harmless", "helpful")


@dataclass(frozen=True)
class CritiqueExample:
    """A worked critique/revision transcript: the dialogue, then one critique and one revision."""
    id: str
    conversation: tuple[Turn, ...]
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    def turns(self) -> tuple[Turn, ...]:
        return self.conversation + (Turn("critique_request", self.critique_request), Turn("critique", self.critique),
                                    Turn("revision_request", self.revision_request), Turn("revision", self.revision))

    def direct_turns(self) -> tuple[Turn, ...]:
        """The example without its critique: the dialogue, the revision request, the revision (paper §3.5)."""
        return self.conversation + (Turn("revision_request", self.revision_request), Turn("revision", self.revision))


@dataclass(frozen=True)
class LabelExample:
    """A worked preference label: `chosen` is the better reply to `conversation`.

    `reasoning` (optional) demonstrates chain-of-thought. `raw` (the paper's chain-of-thought examples) is
    a fully rendered example with a ``{}`` slot for the principle; it is used verbatim when set.
    """
    id: str
    conversation: tuple[Turn, ...] = ()
    chosen: str = ""
    rejected: str = ""
    reasoning: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class Constitution:
    name: str
    source: str
    critique_principles: tuple[CritiquePrinciple, ...]
    choice_principles: tuple[ChoicePrinciple, ...]
    critique_examples: tuple[CritiqueExample, ...] = ()
    label_examples: tuple[LabelExample, ...] = ()
    cot_label_examples: tuple[LabelExample, ...] = ()  # examples with reasoning, for chain-of-thought labels
    judge_principles: tuple[JudgePrinciple, ...] = ()  # held out from training: the evaluation's questions

    def critique_principle(self, principle_id: str) -> CritiquePrinciple:
        return _by_id(self.critique_principles, principle_id, self.source, "critique_revision")

    def choice_principle(self, principle_id: str) -> ChoicePrinciple:
        return _by_id(self.choice_principles, principle_id, self.source, "choice")

    def judge_questions(self, criterion: str) -> tuple[ChoicePrinciple, ...]:
        """The held-out judge principles of `criterion` as choice principles (the label question's shape)."""
        if criterion not in JUDGE_CRITERIA:
            raise ValueError(f"criterion must be one of {JUDGE_CRITERIA}; got {criterion!r}")
        return tuple(ChoicePrinciple(p.id, p.text) for p in self.judge_principles if p.criterion == criterion)


def _by_id(entries, principle_id, source, section):
    for entry in entries:
        if entry.id == principle_id:
            return entry
    raise KeyError(f"{source}: no {section} principle with id {principle_id!r}")


def load_constitution(spec: str | Path = "default") -> Constitution:
    """Load "default", a YAML file of ours, or a folder holding the paper's published JSON files."""
    path = DEFAULT_PATH if str(spec) == "default" else Path(spec)
    if path.is_dir():
        return load_paper_constitution(path)
    if not path.is_file():
        raise ConstitutionError(f"{path}: no such constitution file (give 'default', a YAML file, or a folder "
                                f"with the paper's JSON files {', '.join(PAPER_FILES)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConstitutionError(f"{path}: not valid YAML: {err}") from err
    return parse_constitution(data, source=str(path))


def parse_constitution(data, *, source: str = "<constitution>") -> Constitution:
    """Validate a parsed YAML mapping (the schema of constitutions/default.yaml) into a Constitution."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    known = {"name", "version", "critique_revision", "choice", "critique_revision_examples", "labeling_examples",
             "judge"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConstitutionError(f"{source}: unknown top-level key(s) {unknown}; expected some of {sorted(known)}")
    critique = tuple(CritiquePrinciple(e["id"], e["critique"], e["revision"])
                     for e in _entries(data, "critique_revision", ("id", "critique", "revision"), source))
    choice = tuple(ChoicePrinciple(e["id"], e["text"]) for e in _entries(data, "choice", ("id", "text"), source))
    by_id = {p.id: p for p in critique}
    examples = []
    for i, e in enumerate(_entries(data, "critique_revision_examples",
                                   ("id", "principle", "conversation", "critique", "revision"), source,
                                   required=False)):
        where = _where(source, "critique_revision_examples", i, e)
        if e["principle"] not in by_id:
            raise ConstitutionError(f"{where}: principle {e['principle']!r} is not an id in critique_revision")
        principle = by_id[e["principle"]]
        examples.append(CritiqueExample(e["id"], _conversation(e["conversation"], where), principle.critique,
                                        e["critique"], principle.revision, e["revision"]))
    labels = []
    for i, e in enumerate(_entries(data, "labeling_examples", ("id", "conversation", "chosen", "rejected"), source,
                                   required=False, optional=("reasoning",))):
        where = _where(source, "labeling_examples", i, e)
        labels.append(LabelExample(e["id"], _conversation(e["conversation"], where), e["chosen"], e["rejected"],
                                   e.get("reasoning")))
    judge = []
    for i, e in enumerate(_entries(data, "judge", ("id", "criterion", "text"), source, required=False)):
        if e["criterion"] not in JUDGE_CRITERIA:
            raise ConstitutionError(f"{_where(source, 'judge', i, e)}: criterion must be one of "
                                    f"{list(JUDGE_CRITERIA)}, got {e['criterion']!r}")
        judge.append(JudgePrinciple(e["id"], e["criterion"], e["text"]))
    held_out = {p.id for p in judge} & {p.id for p in choice}
    if held_out:
        raise ConstitutionError(f"{source}: judge principle id(s) {sorted(held_out)} are also choice principles; "
                                f"the judge's questions must be held out from training")
    name = data.get("name", Path(source).stem)
    return Constitution(str(name), source, critique, choice, tuple(examples), tuple(labels),
                        tuple(x for x in labels if x.reasoning), tuple(judge))


def _where(source, section, index, entry) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{source}: {section}[{index}]" + (f" (id {ident!r})" if ident is not None else "")


def _entries(data, section, fields, source, *, required=True, optional=()):
    """The validated list of mappings under `section`: every field a non-empty string, ids unique."""
    entries = data.get(section)
    if entries is None:
        if required:
            raise ConstitutionError(f"{source}: missing section {section!r}")
        return []
    if not isinstance(entries, list) or not entries:
        raise ConstitutionError(f"{source}: section {section!r} must be a non-empty list")
    seen = {}
    for i, entry in enumerate(entries):
        where = _where(source, section, i, entry)
        if not isinstance(entry, dict):
            raise ConstitutionError(f"{where}: must be a mapping with fields {list(fields)}")
        extra = sorted(set(entry) - set(fields) - set(optional))
        if extra:
            raise ConstitutionError(f"{where}: unknown field(s) {extra}; expected {list(fields)}")
        for field in fields:
            if field not in entry:
                raise ConstitutionError(f"{where}: missing field {field!r}")
            if field == "conversation":
                continue
            value = entry[field]
            if not isinstance(value, str) or not value.strip():
                raise ConstitutionError(f"{where}: field {field!r} must be non-empty text, got {value!r}")
        for field in optional:
            if field in entry and (not isinstance(entry[field], str) or not entry[field].strip()):
                raise ConstitutionError(f"{where}: field {field!r} must be non-empty text when given")
        if entry["id"] in seen:
            raise ConstitutionError(f"{where}: duplicate id {entry['id']!r} (first used by entry {seen[entry['id']]})")
        seen[entry["id"]] = i
    return entries


def _conversation(items, where) -> tuple[Turn, ...]:
    """`[{human: ...}, {assistant: ...}, ...]` -> turns; it must start with the human and alternate."""
    if not isinstance(items, list) or not items:
        raise ConstitutionError(f"{where}: field 'conversation' must be a non-empty list of {{human: ...}} / "
                                f"{{assistant: ...}} items")
    turns = []
    for j, item in enumerate(items):
        if not (isinstance(item, dict) and len(item) == 1):
            raise ConstitutionError(f"{where}: conversation[{j}] must be a one-key mapping like {{human: text}}")
        (role, text), = item.items()
        expected = "human" if j % 2 == 0 else "assistant"
        if role != expected:
            raise ConstitutionError(f"{where}: conversation[{j}] should be {expected!r} (turns alternate, "
                                    f"human first), got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise ConstitutionError(f"{where}: conversation[{j}] ({role}) must be non-empty text")
        turns.append(Turn(role, text.strip()))
    return tuple(turns)


# ----------------------------------------------------------------------------------------------------------
# The paper's published JSON format
# ----------------------------------------------------------------------------------------------------------

_RAW_TURN = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")
_ROLE_OF_LABEL = {label: role for role, label in RAW_LABELS.items()}


def parse_raw_transcript(text: str, *, where: str = "<transcript>") -> tuple[Turn, ...]:
    """Split a ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript into turns; a trailing empty turn is dropped."""
    matches = list(_RAW_TURN.finditer(text))
    if not matches or text[:matches[0].start()].strip():
        raise ConstitutionError(f"{where}: expected a transcript starting with '\\n\\nHuman:'")
    turns = []
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        body = text[match.end():end].strip()
        if body or k + 1 < len(matches):
            turns.append(Turn(_ROLE_OF_LABEL[match.group(1)], body))
    return tuple(turns)


def _strip_request(text: str, label: str, answer: str, where: str) -> str:
    """"\\n\\nCritiqueRequest: X\\n\\nCritique:" -> "X"."""
    match = re.fullmatch(rf"\s*{label}:\s*(.*?)\s*{answer}:\s*", text, flags=re.S)
    if not match or not match.group(1):
        raise ConstitutionError(f"{where}: expected '\\n\\n{label}: ...\\n\\n{answer}:', got {text[:80]!r}")
    return match.group(1)


def _read_json(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConstitutionError(f"{path}: missing (a paper-format constitution folder holds {', '.join(PAPER_FILES)})"
                                ) from err
    except json.JSONDecodeError as err:
        raise ConstitutionError(f"{path}: not valid JSON: {err}") from err


def load_paper_constitution(folder: str | Path) -> Constitution:
    """Read the paper's published critique/revision and preference-labelling files from `folder`."""
    folder = Path(folder)
    instructions = _read_json(folder, "CritiqueRevisionInstructions.json")
    src = str(folder / "CritiqueRevisionInstructions.json")
    if not isinstance(instructions, dict) or not instructions:
        raise ConstitutionError(f"{src}: expected a non-empty object of {{id: {{prompt, edit_request}}}}")
    critique = []
    for key, entry in instructions.items():
        where = f"{src}: entry {key!r}"
        if not isinstance(entry, dict) or "prompt" not in entry or "edit_request" not in entry:
            raise ConstitutionError(f"{where}: expected fields 'prompt' (a list) and 'edit_request'")
        prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"]]
        revision = _strip_request(entry["edit_request"], "RevisionRequest", "Revision", where)
        for j, prompt in enumerate(prompts):
            ident = key if len(prompts) == 1 else f"{key}-{j}"
            critique.append(CritiquePrinciple(ident, _strip_request(prompt, "CritiqueRequest", "Critique", where),
                                              revision))
    examples = []
    src = str(folder / "CritiqueRevisionFewShotPrompts.json")
    for i, text in enumerate(_read_json(folder, "CritiqueRevisionFewShotPrompts.json")):
        where = f"{src}: entry {i}"
        turns = parse_raw_transcript(text, where=where)
        roles = [t.role for t in turns]
        try:
            k = roles.index("critique_request")
        except ValueError:
            raise ConstitutionError(f"{where}: no CritiqueRequest turn") from None
        tail = turns[k:k + 4]
        if [t.role for t in tail] != ["critique_request", "critique", "revision_request", "revision"]:
            raise ConstitutionError(f"{where}: expected CritiqueRequest, Critique, RevisionRequest, Revision")
        examples.append(CritiqueExample(f"paper-{i}", turns[:k], *(t.text for t in tail)))
    src = str(folder / "RLMadisonInstructions.json")
    choice = []
    for i, text in enumerate(_read_json(folder, "RLMadisonInstructions.json")):
        body = re.sub(r"\s*Options:\s*$", "", text).strip()
        if not body:
            raise ConstitutionError(f"{src}: entry {i} is empty")
        choice.append(ChoicePrinciple(f"madison-{i}", body))
    labels = []
    src = str(folder / "RLMadisonFewShotPrompts.json")
    for i, entry in enumerate(_read_json(folder, "RLMadisonFewShotPrompts.json")):
        where = f"{src}: entry {i}"
        if not isinstance(entry, dict) or not entry.get("corrects") or not entry.get("incorrects"):
            raise ConstitutionError(f"{where}: expected fields 'prompt', 'corrects', 'incorrects'")
        turns = tuple(t for t in parse_raw_transcript(entry["prompt"], where=where) if t.text)
        labels.append(LabelExample(f"paper-{i}", turns, entry["corrects"][0].strip(), entry["incorrects"][0].strip()))
    cot = []
    if (folder / "RLMadisonPrecogFewShotPrompts.json").exists():
        for i, entry in enumerate(_read_json(folder, "RLMadisonPrecogFewShotPrompts.json")):
            raw = entry["prompt"] if isinstance(entry, dict) else entry
            cot.append(LabelExample(f"paper-cot-{i}", raw=raw))
    return Constitution(f"paper ({folder.name})", str(folder), tuple(critique), tuple(choice), tuple(examples),
                        tuple(labels), tuple(cot))
