"""critique_revise: response -> n rounds of (critique, revision), a principle redrawn every round.

Per prompt: the model answers; then, for red-team prompts (`revise_kinds`), each round appends a critique
request drawn at random from the constitution, samples the critique, appends the matching revision request
and samples the revision, which becomes the reply the next round critiques. The few-shot critique/revision
examples go in front of every request (encoded once per batch, their KV cache shared). Prompts of other kinds
(helpfulness) keep their first response, as the paper mixes in plain helpful samples. Every round's text is
kept. Paper defaults: 4 rounds, temperature 1, the few-shot examples in front.

Output rows: id, prompt, kind, response, critiques [n], revisions [n], principle_ids [n], final (the last
revision, or the response when there are none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..constitution import Turn
from ..models import PromptFormat, generate
from ..prompts import critique_fewshot, critique_request, revision_request, rng_for, seed_for
from .common import Context, run_batches

NAME = "critique_revise"


@dataclass
class CritiqueReviseConfig:
    model: str | None = None  # default: the run's base model
    rounds: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    response_tokens: int = 128
    critique_tokens: int = 128
    revision_tokens: int = 128
    few_shot: int | None = None  # critique/revision examples in front (None: all of the constitution's)
    batch_size: int = 8
    revise_kinds: list[str] = field(default_factory=lambda: ["red_team"])
    prompt_format: str = "auto"  # auto: the tokenizer's chat template if it has one, else raw Human:/Assistant:


def draw_principle(ctx: Context, prompt_id: str, round_index: int):
    """The critique principle for one prompt and round, drawn from (seed, prompt id, round) alone."""
    principles = ctx.constitution.critique_principles
    return principles[rng_for(ctx.seed, NAME, prompt_id, round_index).randrange(len(principles))]


def critique_revise(prompts: list[dict], cfg: CritiqueReviseConfig, ctx: Context) -> list[dict]:
    model, tokenizer = ctx.load(cfg.model)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    fewshot = critique_fewshot(ctx.constitution, cfg.few_shot)
    prefix = fmt.render(fewshot) if fewshot else ""
    stop = fmt.stop_strings()

    def sample(conversations, next_role, max_new_tokens, batch_index, what):
        texts = [fmt.render(fewshot + conv, next_role=next_role) for conv in conversations]
        return generate(model, tokenizer, texts, prefix=prefix, max_new_tokens=max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=len(texts),
                        seed=seed_for(ctx.seed, NAME, batch_index, what), stop=stop)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        conversations = [[Turn("human", row["prompt"])] for row in batch]
        responses = sample(conversations, "assistant", cfg.response_tokens, batch_index, "response")
        rows = []
        for row, conv, response in zip(batch, conversations, responses):
            conv.append(Turn("assistant", response))
            rows.append({"id": row["id"], "prompt": row["prompt"], "kind": row["kind"], "response": response,
                         "critiques": [], "revisions": [], "principle_ids": [], "final": response})
        active = [i for i, row in enumerate(batch) if row["kind"] in cfg.revise_kinds]
        for r in range(cfg.rounds if active else 0):
            principles = {i: draw_principle(ctx, batch[i]["id"], r) for i in active}
            for i in active:
                conversations[i].append(critique_request(principles[i]))
            critiques = sample([conversations[i] for i in active], "critique", cfg.critique_tokens, batch_index,
                               f"critique-{r}")
            for i, critique in zip(active, critiques):
                conversations[i] += [Turn("critique", critique), revision_request(principles[i])]
            revisions = sample([conversations[i] for i in active], "revision", cfg.revision_tokens, batch_index,
                               f"revision-{r}")
            for i, revision in zip(active, revisions):
                conversations[i].append(Turn("revision", revision))
                rows[i]["critiques"].append(critiques[active.index(i)])
                rows[i]["revisions"].append(revision)
                rows[i]["principle_ids"].append(principles[i].id)
                rows[i]["final"] = revision
        return rows

    return run_batches(ctx, NAME, prompts, cfg.batch_size, process, desc=NAME, fingerprint=vars(cfg))
