"""sample_pairs: two sampled responses per prompt from the SL model, to be compared by the feedback model.

Only prompts of `kinds` get pairs (the paper: red-team prompts; the helpfulness side of the preference model
is human-labelled, see train_pm), `pairs_per_prompt` pairs each.

Output rows: id (the prompt's id, "#k" appended for its k-th pair when there are several), prompt, kind,
response_a, response_b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..models import PromptFormat, generate
from ..prompts import seed_for
from .common import Context, run_batches

NAME = "sample_pairs"


@dataclass
class SamplePairsConfig:
    model: str | None = None  # default: the sft stage's model
    temperature: float = field(default=1.0, metadata={"ge": 0})  # 0: greedy
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    max_new_tokens: int = field(default=128, metadata={"ge": 1})
    batch_size: int = field(default=8, metadata={"ge": 1})  # pairs per batch (2x as many sequences)
    # prompts that get AI-labelled pairs (the paper: red-team prompts)
    kinds: list[str] = field(default_factory=lambda: ["red_team"], metadata={"min_len": 1, "unique": True})
    pairs_per_prompt: int = field(default=1, metadata={"ge": 1})
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def pair_items(prompts: list[dict], cfg: SamplePairsConfig) -> list[dict]:
    """One item per pair to sample: the prompts of `kinds`, each `pairs_per_prompt` times (ids made unique)."""
    chosen = [p for p in prompts if p["kind"] in cfg.kinds]
    if not chosen:
        raise ValueError(f"sample_pairs.kinds {cfg.kinds} matches none of the prompts' kinds "
                         f"{sorted({p['kind'] for p in prompts})}")
    if cfg.pairs_per_prompt == 1:
        return chosen
    return [dict(p, id=f"{p['id']}#{k}") for p in chosen for k in range(cfg.pairs_per_prompt)]


def sample_pairs(prompts: list[dict], cfg: SamplePairsConfig, ctx: Context) -> list[dict]:
    return run_batches(ctx, NAME, pair_items(prompts, cfg), cfg.batch_size,
                       make_process=partial(make_sample_pairs_process, cfg), desc=NAME, fingerprint=vars(cfg))


def make_sample_pairs_process(cfg: SamplePairsConfig, ctx: Context):
    """Load the SL model; returns process(batch_index, prompts) -> rows with two sampled responses each."""
    model, tokenizer = ctx.load(cfg.model, default="sft")
    fmt = PromptFormat(tokenizer, cfg.prompt_format)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        texts = [fmt.render(fmt.conversation(row["prompt"]), next_role="assistant") for row in batch]
        samples = generate(model, tokenizer, [t for t in texts for _ in range(2)], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, batch_size=2 * len(texts),
                           seed=seed_for(ctx.seed, NAME, batch_index), stop=fmt.stop_strings(),
                           overflow=ctx.prompt_overflow)
        rows = [{"id": row["id"], "prompt": row["prompt"], "kind": row["kind"],
                 "response_a": samples[2 * i], "response_b": samples[2 * i + 1]} for i, row in enumerate(batch)]
        ctx.run.metrics.log(NAME, batch_index, pairs=len(rows),
                            response_words=sum(len(s.split()) for s in samples) / len(samples),
                            identical_pairs=sum(r["response_a"] == r["response_b"] for r in rows))
        return rows

    return process
