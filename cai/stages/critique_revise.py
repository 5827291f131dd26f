"""critique_revise: response -> n rounds of (critique, revision), a principle redrawn every round.

Per prompt: the model answers; then, for red-team prompts (`revise_kinds`), each round asks for a critique by a
principle drawn at random from the constitution, samples it, asks for the matching revision and samples that,
which becomes the reply the next round critiques. Options (paper defaults first):
  * history "latest": each round reads the prompt and the latest revision as the assistant's reply (the
    conversation is re-assembled); "full": the whole transcript so far, older critiques and revisions included;
  * critique true: critique, then revise; false: revise directly from the revision request, with no critique
    call at all (paper §3.5; the few-shot examples then show no critiques either);
  * helpful_samples: prompts of other kinds (helpfulness) are not revised; they keep this many sampled responses
    (paper: 2), all of them SFT targets;
  * ablation: also revise the red-team prompts the other way (critique toggled) from the same first responses
    with the same principles, for the judge's critiqued vs direct revision curves (sft never reads them).
The few-shot critique/revision examples go in front of every request (encoded once per stage, their KV cache
shared).

Output rows: id, prompt, kind, response, samples (the responses of a prompt that is not revised: response first;
[response] for revised ones), critiques [n] ([] without critiques), revisions [n], principle_ids [n], final (the
last revision, or the response), ablation ("direct" / "critique" / ""), ablation_critiques, ablation_revisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..constitution import Turn
from ..models import PromptFormat, SharedPrefix, generate
from ..prompts import critique_fewshot, critique_request, revision_request, rng_for, seed_for
from ..reporting import clip, format_value, stage_rows
from ..rundir import RunDir
from .common import Context, run_batches

NAME = "critique_revise"
HISTORY = ("latest", "full")


@dataclass
class CritiqueReviseConfig:
    model: str | None = None  # default: the run's base model
    rounds: int = field(default=4, metadata={"ge": 0})
    temperature: float = field(default=1.0, metadata={"ge": 0})  # 0: greedy
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    response_tokens: int = field(default=128, metadata={"ge": 1})
    critique_tokens: int = field(default=128, metadata={"ge": 1})
    revision_tokens: int = field(default=128, metadata={"ge": 1})
    # critique/revision examples in front (None: all of the constitution's)
    few_shot: int | None = field(default=None, metadata={"ge": 0})
    batch_size: int = field(default=8, metadata={"ge": 1})
    revise_kinds: list[str] = field(default_factory=lambda: ["red_team"])
    # False: revise directly from the revision request, no critique (paper §3.5)
    critique: bool = True
    # "latest": each round reads the prompt + the latest revision (paper); "full": the whole transcript so far
    history: str = field(default="latest", metadata={"choices": HISTORY})
    # responses kept per prompt that is not revised (paper: 2)
    helpful_samples: int = field(default=1, metadata={"ge": 1})
    ablation: bool = False  # also revise with critique toggled, for the judge's critique vs critique-free curves
    # auto: the tokenizer's chat template if it has one, else raw Human:/Assistant:
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def draw_principle(ctx: Context, prompt_id: str, round_index: int):
    """The critique principle for one prompt and round, drawn from (seed, prompt id, round) alone."""
    principles = ctx.constitution.critique_principles
    return principles[rng_for(ctx.seed, NAME, prompt_id, round_index).randrange(len(principles))]


def _mean_words(texts) -> float | None:
    counts = [len(t.split()) for t in texts]
    return sum(counts) / len(counts) if counts else None


def critique_revise(prompts: list[dict], cfg: CritiqueReviseConfig, ctx: Context) -> list[dict]:
    if cfg.history not in HISTORY:
        raise ValueError(f"critique_revise.history must be one of {HISTORY}; got {cfg.history!r}")
    if cfg.helpful_samples < 1:
        raise ValueError(f"critique_revise.helpful_samples must be >= 1; got {cfg.helpful_samples}")
    return run_batches(ctx, NAME, prompts, cfg.batch_size, make_process=partial(make_critique_revise_process, cfg),
                       desc=NAME, fingerprint=vars(cfg))


def make_critique_revise_process(cfg: CritiqueReviseConfig, ctx: Context):
    """Load the model; returns process(batch_index, prompts) -> rows with every round's critique and revision."""
    model, tokenizer = ctx.load(cfg.model)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    stop = fmt.stop_strings()
    modes = [cfg.critique] + ([not cfg.critique] if cfg.ablation else [])
    fewshot, prefixes = {}, {}
    for with_critique in modes:
        fewshot[with_critique] = critique_fewshot(ctx.constitution, cfg.few_shot, critique=with_critique)
        # the few-shot transcript opens every request: encoded once for the whole stage
        prefixes[with_critique] = (SharedPrefix(model, tokenizer, fmt.render(fewshot[with_critique]))
                                   if fewshot[with_critique] else "")

    def sample(conversations, next_role, max_new_tokens, batch_index, what, with_critique):
        texts = [fmt.render(fewshot[with_critique] + conv, next_role=next_role) for conv in conversations]
        return generate(model, tokenizer, texts, prefix=prefixes[with_critique], max_new_tokens=max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(texts),
                        seed=seed_for(ctx.seed, NAME, batch_index, what), stop=stop,
                        overflow=ctx.prompt_overflow)

    def revise(batch, responses, batch_index, with_critique, tag):
        """Every round of one mode for the rows of `batch`: (critiques, revisions, principle ids) per row."""
        history = [[Turn("human", row["prompt"]), Turn("assistant", reply)] for row, reply in zip(batch, responses)]
        latest = list(responses)
        out = [([], [], []) for _ in batch]
        for r in range(cfg.rounds):
            principles = [draw_principle(ctx, row["id"], r) for row in batch]
            if cfg.history == "latest":  # the prompt and the reply as it stands now
                history = [[Turn("human", row["prompt"]), Turn("assistant", reply)]
                           for row, reply in zip(batch, latest)]
            critiques = [None] * len(batch)
            if with_critique:
                asks = [conv + [critique_request(p)] for conv, p in zip(history, principles)]
                critiques = sample(asks, "critique", cfg.critique_tokens, batch_index, f"{tag}critique-{r}", True)
                history = [ask + [Turn("critique", c)] for ask, c in zip(asks, critiques)]
            asks = [conv + [revision_request(p)] for conv, p in zip(history, principles)]
            revisions = sample(asks, "revision", cfg.revision_tokens, batch_index, f"{tag}revision-{r}", with_critique)
            history = [ask + [Turn("revision", v)] for ask, v in zip(asks, revisions)]
            latest = revisions
            for k, (critique, revision, principle) in enumerate(zip(critiques, revisions, principles)):
                if with_critique:
                    out[k][0].append(critique)
                out[k][1].append(revision)
                out[k][2].append(principle.id)
        return out

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        conversations = [[Turn("human", row["prompt"])] for row in batch]
        responses = sample(conversations, "assistant", cfg.response_tokens, batch_index, "response", cfg.critique)
        rows = [{"id": row["id"], "prompt": row["prompt"], "kind": row["kind"], "response": response,
                 "samples": [response], "critiques": [], "revisions": [], "principle_ids": [], "final": response,
                 "ablation": "", "ablation_critiques": [], "ablation_revisions": []}
                for row, response in zip(batch, responses)]
        active = [i for i, row in enumerate(batch) if row["kind"] in cfg.revise_kinds]
        kept = [i for i in range(len(batch)) if i not in active]
        for k in range(1, cfg.helpful_samples if kept else 0):  # more samples of the prompts that are not revised
            extra = sample([conversations[i] for i in kept], "assistant", cfg.response_tokens, batch_index,
                           f"response-{k}", cfg.critique)
            for i, text in zip(kept, extra):
                rows[i]["samples"].append(text)
        if active and cfg.rounds > 0:
            chosen = [batch[i] for i in active]
            first = [responses[i] for i in active]
            for i, (critiques, revisions, principle_ids) in zip(active, revise(chosen, first, batch_index,
                                                                               cfg.critique, "")):
                rows[i].update(critiques=critiques, revisions=revisions, principle_ids=principle_ids,
                               final=revisions[-1])
            if cfg.ablation:
                other = not cfg.critique
                for i, (critiques, revisions, _) in zip(active, revise(chosen, first, batch_index, other,
                                                                       "ablation-")):
                    rows[i].update(ablation="critique" if other else "direct", ablation_critiques=critiques,
                                   ablation_revisions=revisions)
        revised = [rows[i] for i in active]
        ctx.run.metrics.log(NAME, batch_index, prompts=len(rows), revised=len(revised),
                            response_words=_mean_words(r["response"] for r in rows),
                            critique_words=_mean_words(c for r in revised for c in r["critiques"]),
                            revision_words=_mean_words(v for r in revised for v in r["revisions"]),
                            ablation_revision_words=_mean_words(v for r in revised for v in r["ablation_revisions"]))
        return rows

    return process


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """Rounds, samples and lengths, one example (the judge's revision curves are in the evaluation section)."""
    revisions = stage_rows(run, NAME)
    if not revisions:
        return []
    revised = [r for r in revisions if r["revisions"]]
    kept = [r for r in revisions if not r["revisions"]]
    with_critique = any(r["critiques"] for r in revised)
    rounds = max((len(r["revisions"]) for r in revised), default=0)
    out = ["## Critique and revision", "",
           f"{len(revisions)} prompts; {len(revised)} red-team prompts went through {rounds} rounds of "
           f"{'critique and revision' if with_critique else 'revision without critique'} (principle redrawn every "
           f"round); {len(kept)} other prompts kept {format_value(max((len(r['samples']) for r in kept), default=0))}"
           f" sampled response(s) each.", ""]
    ablated = [r for r in revised if r.get("ablation")]
    if ablated:
        out += [f"Ablation: the same {len(ablated)} prompts were also revised "
                f"{'without critiques' if ablated[0]['ablation'] == 'direct' else 'with critiques'}, from the same "
                f"first answers and principles (the judge compares both in the evaluation section).", ""]
    words = metrics.get(NAME, [])
    if words:
        def mean_of(key):
            values = [r[key] for r in words if r.get(key) is not None]
            return sum(values) / len(values) if values else None
        out += [f"Mean length in words: first answers {format_value(mean_of('response_words'), 1)}, "
                f"critiques {format_value(mean_of('critique_words'), 1)}, "
                f"revisions {format_value(mean_of('revision_words'), 1)}"
                + (f", ablation revisions {format_value(mean_of('ablation_revision_words'), 1)}" if ablated else "")
                + ".", ""]
    if revised:
        ex = revised[0]
        out += ["Example:", "", f"- **Prompt:** {clip(ex['prompt'])}", f"- **First answer:** {clip(ex['response'])}"]
        critiques = ex["critiques"] or [None] * len(ex["revisions"])
        for k, (c, v, p) in enumerate(zip(critiques, ex["revisions"], ex["principle_ids"]), 1):
            if c is not None:
                out.append(f"- **Critique {k}** (`{p}`): {clip(c)}")
            out.append(f"- **Revision {k}**{'' if c is not None else f' (`{p}`)'}: {clip(v)}")
        out.append("")
    return out
