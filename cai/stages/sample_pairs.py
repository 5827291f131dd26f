"""sample_pairs: two sampled responses per prompt from the SL model, to be compared by the feedback model.

Output rows: id, prompt, kind, response_a, response_b.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import PromptFormat, generate
from ..prompts import seed_for
from .common import Context, run_batches

NAME = "sample_pairs"


@dataclass
class SamplePairsConfig:
    model: str | None = None  # default: the sft stage's model
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts per batch (2x as many sequences)
    prompt_format: str = "auto"


def sample_pairs(prompts: list[dict], cfg: SamplePairsConfig, ctx: Context) -> list[dict]:
    model, tokenizer = ctx.load(cfg.model, default="sft")
    fmt = PromptFormat(tokenizer, cfg.prompt_format)

    def process(batch_index: int, batch: list[dict]) -> list[dict]:
        texts = [fmt.render(fmt.conversation(row["prompt"]), next_role="assistant") for row in batch]
        samples = generate(model, tokenizer, [t for t in texts for _ in range(2)], max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, batch_size=2 * len(texts),
                           seed=seed_for(ctx.seed, NAME, batch_index), stop=fmt.stop_strings())
        return [{"id": row["id"], "prompt": row["prompt"], "kind": row["kind"],
                 "response_a": samples[2 * i], "response_b": samples[2 * i + 1]} for i, row in enumerate(batch)]

    return run_batches(ctx, NAME, prompts, cfg.batch_size, process, desc=NAME, fingerprint=vars(cfg))
