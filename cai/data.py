"""Prompt sets and multiple-choice eval files.

Prompt sources (a list in the run config):
    builtin:red_team, builtin:helpful   our own small sets in cai/data/ (red-team style requests, everyday
                                        helpfulness questions); builtin:red_team_eval, builtin:helpful_eval
                                        are held out from training, for the evaluation
    path/to/file.jsonl | .json | .csv   rows with a `prompt` field, or a raw `\\n\\nHuman: ...` transcript in
                                        `transcript` / `chosen` (the first human turn becomes the prompt);
                                        an optional `kind` field ("red_team" rows get critiqued and revised)
    hf:NAME[:SPLIT]                     an HF dataset (from the local HF cache unless downloads are allowed),
                                        read the same way
Each prompt row is {"id", "prompt", "kind"}.

Human comparisons (the helpfulness side of the hybrid preference model, `load_comparisons`):
    builtin:helpful_pairs               our own small set of helpfulness comparisons (cai/data/helpful_pairs.jsonl)
    path/to/file.jsonl | .json | .csv   rows with `prompt`, `chosen`, `rejected` (the two replies), or hh-rlhf's
                                        `chosen` / `rejected` transcripts (``\n\nHuman: ...\n\nAssistant: ...``)
    hf:NAME[:SPLIT[:DATA_DIR]]          an HF dataset read the same way, e.g. hf:Anthropic/hh-rlhf:train:helpful-base

Multiple-choice files use the paper's eval format: one JSON object per line with `prompt` and the option
strings `corrects` and `incorrects` (continuations of the prompt). `paper:NAME` finds NAME in the folder of
the paper's published data ($CAI_PAPER_DATA, or ../shared/data/anthropic-cai next to the checkout).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .constitution import parse_raw_transcript

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {"red_team": DATA_DIR / "red_team.jsonl", "helpful": DATA_DIR / "helpful.jsonl",
           "harmless_mc": DATA_DIR / "harmless_mc.jsonl", "helpful_pairs": DATA_DIR / "helpful_pairs.jsonl",
           "red_team_eval": DATA_DIR / "red_team_eval.jsonl", "helpful_eval": DATA_DIR / "helpful_eval.jsonl"}


@dataclass
class PromptsConfig:
    sources: list[str] = field(default_factory=lambda: ["builtin:red_team", "builtin:helpful"],
                               metadata={"min_len": 1, "unique": True})
    # the first N prompts of each source (None: all)
    limit_per_source: int | None = field(default=None, metadata={"ge": 0})


def paper_data_dir() -> Path | None:
    """The folder of the paper's published files, if this machine has it (it is not part of the project)."""
    candidates = [os.environ.get("CAI_PAPER_DATA")]
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data" / "anthropic-cai",
                   here.parent.parent / "shared" / "data" / "anthropic-cai"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "438HHHEvaluations.jsonl").is_file():
            return Path(candidate)
    return None


def resolve_path(spec: str) -> Path | None:
    """builtin:NAME / paper:NAME / a path -> a file path, or None when a paper: file is not on this machine."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown builtin data set {spec!r}; have {sorted('builtin:' + k for k in BUILTIN)}")
        return BUILTIN[name]
    if spec.startswith("paper:"):
        folder = paper_data_dir()
        return folder / spec.split(":", 1)[1] if folder else None
    return Path(spec)


def located_records(spec: str, *, allow_download: bool = False) -> list[tuple[str, dict]]:
    """[(where, row)] of a JSONL / JSON / CSV file, a builtin set, or an HF dataset (hf:NAME[:SPLIT]).

    `where` names the row for messages: "path line 7" (JSONL, 1-based line), "path item 3" (JSON),
    "path line 4" (CSV), "hf:NAME row 3". A line that is not JSON is an error naming it. With
    allow_download false an hf: source is read from the local HF cache without a single network request.
    """
    if spec.startswith("hf:"):
        from .offline import hub_offline

        name, _, rest = spec[3:].partition(":")
        split, _, data_dir = rest.partition(":")
        with hub_offline(not allow_download):  # before `datasets` is imported: it reads the switch then
            from datasets import load_dataset

            try:
                rows = load_dataset(name, split=split or "train", data_dir=data_dir or None).to_list()
            except Exception as err:
                if allow_download:
                    raise
                raise FileNotFoundError(f"{spec}: not found locally, and downloads are off (set allow_download: "
                                        f"true to fetch it from the Hub): {type(err).__name__}: {err}") from err
        return [(f"{spec} row {i}", row) for i, row in enumerate(rows)]
    path = resolve_path(spec)
    if path is None:
        raise FileNotFoundError(f"{spec}: the paper's data folder is not on this machine (set CAI_PAPER_DATA)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(f"{path} line {reader.line_num}", row) for row in reader]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        data = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else None
        if data is None:
            raise ValueError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        return [(f"{path} item {i}", row) for i, row in enumerate(data)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    return records


def read_records(spec: str, *, allow_download: bool = False) -> list[dict]:
    """Rows of a JSONL / JSON / CSV file, a builtin set, or an HF dataset (hf:NAME[:SPLIT]); see located_records."""
    return [row for _, row in located_records(spec, allow_download=allow_download)]


def _prompt_of(row: dict, where: str) -> str:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        text = row["prompt"]
        if "\n\nHuman:" not in text:
            return text.strip()
    else:
        text = next((row[k] for k in ("transcript", "chosen") if isinstance(row.get(k), str)), None)
        if text is None:
            raise ValueError(f"{where}: no 'prompt' field (nor a 'transcript' / 'chosen' transcript)")
    human = [t for t in parse_raw_transcript(text[text.index("\n\nHuman:"):], where=where) if t.role == "human"]
    return human[0].text


def prompt_rows(records: list[dict], tag: str, seen: set | None = None) -> list[dict]:
    """Records (a `prompt` field or a raw transcript; optional `id`, `kind`) -> [{"id", "prompt", "kind"}]."""
    seen = set() if seen is None else seen
    rows = []
    for i, row in enumerate(records):
        ident = str(row.get("id") or f"{tag}-{i:05d}")
        if ident in seen:
            ident = f"{tag}-{i:05d}"
        seen.add(ident)
        rows.append({"id": ident, "prompt": _prompt_of(row, f"{tag} row {i}"), "kind": str(row.get("kind") or "red_team")})
    return rows


def load_prompts(cfg: PromptsConfig, *, allow_download: bool = False) -> list[dict]:
    """[{"id", "prompt", "kind"}] from every source, in order; ids unique."""
    prompts, seen = [], set()
    for spec in cfg.sources:
        records = read_records(spec, allow_download=allow_download)
        if not records:
            raise ValueError(f"{spec}: no rows (an empty prompt source)")
        if cfg.limit_per_source is not None:
            records = records[:cfg.limit_per_source]
        tag = spec.split(":", 1)[1] if spec.startswith(("builtin:", "hf:")) else Path(spec).stem
        prompts += prompt_rows(records, tag, seen)
    if not prompts:
        raise ValueError(f"no prompts in {cfg.sources}")
    return prompts


def split_transcript(text: str, where: str) -> tuple[str, str]:
    """A raw transcript ending in an assistant turn -> (the context before that turn, the assistant's reply).

    The context is the human's text when it is a single human turn, else the raw transcript of the earlier
    turns (which `prompts.prompt_turns` reads back as turns).
    """
    cut = text.rfind("\n\nAssistant:")
    if not text.startswith("\n\nHuman:") or cut < 0:
        raise ValueError(f"{where}: expected a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript")
    context, reply = text[:cut], text[cut + len("\n\nAssistant:"):].strip()
    turns = parse_raw_transcript(context, where=where)
    if len(turns) == 1 and turns[0].role == "human":
        context = turns[0].text
    return context, reply


def comparison_rows(records: list[dict], tag: str) -> tuple[list[dict], int]:
    """Human comparisons -> ([{"id", "prompt", "chosen", "rejected"}], rows dropped).

    A row has `prompt` and the two replies `chosen` / `rejected`, or `chosen` / `rejected` transcripts that
    share everything before their last assistant turn (hh-rlhf). Transcripts whose contexts differ, and rows
    whose two replies are identical or empty, are dropped (they carry no preference about one reply).
    """
    rows, dropped = [], 0
    for i, row in enumerate(records):
        where = f"{tag} row {i}"
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ValueError(f"{where}: expected 'chosen' and 'rejected' text fields (and 'prompt', or transcripts)")
        if chosen.startswith("\n\nHuman:") and rejected.startswith("\n\nHuman:"):
            (prompt, chosen), (other, rejected) = split_transcript(chosen, where), split_transcript(rejected, where)
            if prompt != other:
                dropped += 1
                continue
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: no 'prompt' field (and 'chosen' / 'rejected' are not transcripts)")
            prompt, chosen, rejected = prompt.strip(), chosen.strip(), rejected.strip()
        if not chosen or not rejected or chosen == rejected:
            dropped += 1
            continue
        rows.append({"id": str(row.get("id") or f"{tag}-{i:05d}"), "prompt": prompt, "chosen": chosen,
                     "rejected": rejected})
    return rows, dropped


def load_comparisons(specs: list[str], *, limit_per_source: int | None = None,
                     allow_download: bool = False) -> tuple[list[dict], int]:
    """Human comparisons from every source in `specs` ([{"id", "prompt", "chosen", "rejected"}], rows dropped);
    ids made unique across sources."""
    out, dropped, seen = [], 0, set()
    for spec in specs:
        records = read_records(spec, allow_download=allow_download)
        if not records:
            raise ValueError(f"{spec}: no comparisons (the source has no rows)")
        if limit_per_source is not None:
            records = records[:limit_per_source]
        tag = spec.split(":", 1)[1] if spec.startswith(("builtin:", "hf:")) else Path(spec).stem
        rows, lost = comparison_rows(records, tag)
        for row in rows:
            if row["id"] in seen:
                row["id"] = f"{tag}-{row['id']}"
            seen.add(row["id"])
        out += rows
        dropped += lost
    return out, dropped


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice question: `options[:num_correct]` are the correct continuations of `prompt`."""
    prompt: str
    options: tuple[str, ...]
    num_correct: int = 1


def mc_question(row, where: str) -> MCQuestion:
    """One question of the paper's eval format: `prompt` (non-empty text), `corrects` and `incorrects` (non-empty
    lists of non-empty option strings). Anything else is a ValueError naming `where` (file and line)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt, corrects, incorrects; got {row!r:.80}")
    missing = [k for k in ("prompt", "corrects", "incorrects") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (the paper's format: prompt, corrects, incorrects)")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise ValueError(f"{where}: 'prompt' must be non-empty text; got {row['prompt']!r:.80}")
    for key in ("corrects", "incorrects"):
        options = row[key]
        if not isinstance(options, list) or not options:
            raise ValueError(f"{where}: {key!r} must be a non-empty list of option strings, e.g. [\" (A)\"]; "
                             f"got {options!r:.80}")
        bad = [o for o in options if not isinstance(o, str) or not o]
        if bad:
            raise ValueError(f"{where}: {key!r} must hold non-empty strings; got {bad[0]!r:.80}")
    return MCQuestion(row["prompt"], tuple(row["corrects"]) + tuple(row["incorrects"]), len(row["corrects"]))


def load_mc_questions(spec: str, limit: int | None = None) -> list[MCQuestion]:
    """Questions of a file in the paper's eval format (`prompt`, `corrects`, `incorrects`), the first `limit`
    (>= 1; None: all). Every row is checked (a malformed one is an error naming its line); no rows is an error."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of questions (or None for all); got {limit!r}")
    questions = [mc_question(row, where) for where, row in located_records(spec)]
    if not questions:
        raise ValueError(f"{spec}: no questions (the file has no rows)")
    return questions if limit is None else questions[:limit]


def eval_format_problem(spec: str) -> str:
    """"" when every row of `spec` is a question of the paper's eval format (`mc_question`); otherwise what is
    wrong with the first bad row (or "no rows"). The message names the row by its number and never quotes the
    file's text (reports list these, and some files' text must not be copied)."""
    try:
        records = located_records(spec)
    except (ValueError, OSError) as err:
        return f"unreadable ({type(err).__name__})"
    if not records:
        return "no rows"
    for number, (where, row) in enumerate(records):
        if not isinstance(row, dict):
            return f"row {number} is not an object with prompt, corrects, incorrects"
        missing = [k for k in ("prompt", "corrects", "incorrects") if k not in row]
        if missing:
            return f"row {number} lacks {', '.join(missing)}"
        try:
            mc_question(row, where)
        except ValueError:
            return f"row {number}: prompt, corrects or incorrects are not text / lists of option strings"
    return ""


def eval_files(specs: list[str]) -> list[tuple[str, Path | None, str]]:
    """Every eval file `specs` name, as (spec, path, "") or, for one that cannot be read as an eval,
    (spec, path or None, why). A spec is a file, builtin:NAME, paper:NAME, a folder or paper:* (each .json /
    .jsonl file in it, kept when its rows are in the paper's eval format), or a glob pattern."""
    import glob

    found: list[tuple[str, Path | None, str]] = []
    for spec in specs:
        named = spec.startswith(("paper:", "builtin:", "hf:"))
        if spec in ("paper:*", "paper:") or (not named and Path(spec).is_dir()):
            folder = paper_data_dir() if spec.startswith("paper:") else Path(spec)
            if folder is None:
                found.append((spec, None, "the paper's data folder is not on this machine (set CAI_PAPER_DATA)"))
                continue
            for path in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".jsonl")):
                name = f"paper:{path.name}" if spec.startswith("paper:") else str(path)
                problem = eval_format_problem(str(path))
                found.append((name, path, problem and f"not in the eval format: {problem}"))
            continue
        if any(c in spec for c in "*?[") and not named:
            matches = sorted(glob.glob(spec))
            found += [(m, Path(m), "") for m in matches] or [(spec, None, "no file matches")]
            continue
        path = resolve_path(spec)
        if path is None:
            found.append((spec, None, "the paper's data folder is not on this machine (set CAI_PAPER_DATA)"))
        elif not path.is_file():
            found.append((spec, path, "no such file"))
        else:
            found.append((spec, path, ""))
    return found


def load_eval_comparisons(spec: str, limit: int | None = None) -> list[dict]:
    """An eval file's questions as comparisons for a preference model: rows with `text_correct` and
    `text_incorrect` transcripts (the paper's HHH evals) -> [{"prompt", "chosen", "rejected"}] (the shared
    context and the two final assistant replies), in file order; the first `limit` rows."""
    out = []
    for i, (where, row) in enumerate(located_records(spec)):
        if limit is not None and i >= limit:
            break
        good, bad = row.get("text_correct"), row.get("text_incorrect")
        if not isinstance(good, str) or not isinstance(bad, str):
            raise ValueError(f"{where}: expected 'text_correct' and 'text_incorrect' transcripts")
        (prompt, chosen), (other, rejected) = split_transcript(good, where), split_transcript(bad, where)
        if prompt != other:
            raise ValueError(f"{where}: the two transcripts differ before their last assistant turn")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out
