"""sft: fine-tune the policy on the revisions (the SL-CAI model), loss on response tokens only.

The examples (`sft_examples`): per red-team prompt, the prompt followed by each round's revision
(targets "all_rounds", the paper: 4 rounds = 4 examples) or by the last one only ("final"); per prompt that was
not revised (helpfulness), the prompt followed by each of its sampled responses (critique_revise.helpful_samples;
the paper: 2). The loss is the mean negative log-likelihood of the response tokens,
computed by `cai_kernels.linear_token_logprobs` from the final hidden states and the LM head weight, so
the (tokens x vocabulary) logits are never built. Checkpoints every `save_every` steps let a killed run
resume; the model is saved to sft/model (safetensors). Output rows: the training log (step, loss, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import PromptFormat, context_length
from ..reporting import plot
from ..rundir import RunDir
from ..training import IGNORE, encode_dialogue, response_batch, save_pretrained, sequence_token_logprobs, set_trainable
from .common import Context, EpochSchedule
from .training_loop import TrainingLoop

NAME = "sft"
TARGETS = ("final", "all_rounds")


@dataclass
class SFTConfig:
    model: str | None = None  # the model to fine-tune; default: the run's base model
    epochs: int = field(default=1, metadata={"ge": 1})
    max_steps: int | None = field(default=None, metadata={"ge": 1})  # stop early after this many optimizer steps
    batch_size: int = field(default=8, metadata={"ge": 1})
    lr: float = field(default=1e-5, metadata={"ge": 0})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0})
    max_length: int = field(default=512, metadata={"ge": 2})  # tokens of prompt + response
    # "all_rounds": every round's revision is a target (paper); "final": the last one only
    targets: str = field(default="all_rounds", metadata={"choices": TARGETS})
    # None: all parameters; N: the last N blocks + final norm
    train_layers: int | None = field(default=None, metadata={"ge": 1})
    save_every: int = field(default=50, metadata={"ge": 1})  # optimizer steps between resumable checkpoints
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def sft_examples(revisions: list[dict], targets: str) -> list[dict]:
    """{"id", "prompt", "target", "source"} per training example of the critique_revise rows.

    Revised rows: one example per round's revision ("all_rounds") or the last revision ("final"); rows that
    were not revised: one example per sampled response (`samples`, or `final` in rows without samples).
    """
    if targets not in TARGETS:
        raise ValueError(f"sft.targets must be one of {TARGETS}; got {targets!r}")
    examples = []
    for row in revisions:
        if row.get("revisions"):
            chosen = row["revisions"] if targets == "all_rounds" else row["revisions"][-1:]
            start = len(row["revisions"]) - len(chosen) + 1
            examples += [{"id": row["id"], "prompt": row["prompt"], "target": text, "source": f"revision {k}"}
                         for k, text in enumerate(chosen, start)]
        else:
            samples = row.get("samples") or [row["final"]]
            examples += [{"id": row["id"], "prompt": row["prompt"], "target": text, "source": f"sample {k}"}
                         for k, text in enumerate(samples, 1)]
    return examples


def sft(revisions: list[dict], cfg: SFTConfig, ctx: Context) -> list[dict]:
    stage_dir = ctx.run.stage(NAME)
    dataset = sft_examples(revisions, cfg.targets)
    model, tokenizer = ctx.load(cfg.model)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    max_length = min(cfg.max_length, context_length(model) or cfg.max_length)  # never past the model's context
    examples = [encode_dialogue(fmt, tokenizer, e["prompt"], e["target"], max_length) for e in dataset]
    if ctx.dp.is_main:
        ctx.run.metrics.log(NAME + "_data", 0, examples=len(examples), prompts=len(revisions),
                            revision_examples=sum(e["source"].startswith("revision") for e in dataset),
                            sample_examples=sum(e["source"].startswith("sample") for e in dataset))
    params = set_trainable(model, cfg.train_layers)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = EpochSchedule(len(examples), cfg.batch_size, cfg.epochs, cfg.max_steps, ctx.seed, NAME)
    loop = TrainingLoop(ctx, NAME, modules={"model": model}, optimizer=optimizer, total=schedule.total,
                        save_every=cfg.save_every, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm)
    dp = ctx.dp  # data-parallel ranks (cai.scaleout.data_parallel): each takes a slice of every batch
    model.train()
    for step in loop.steps():
        batch = dp.shard([examples[i] for i in schedule.indices(step)])
        loss_sum, local_tokens = torch.zeros((), device=model.device), 0
        if batch:
            ids, mask, targets = (t.to(model.device) for t in response_batch(batch, tokenizer.pad_token_id))
            loss_sum = -sequence_token_logprobs(model, ids, mask, targets).sum()
            local_tokens = int((targets != IGNORE).sum())
        tokens = dp.sum(local_tokens)
        # the slice's share of the batch's token-mean loss: summed over ranks, the one-process loss
        loss = loss_sum / tokens.clamp(min=1).to(loss_sum.dtype)
        if loss.requires_grad:  # a rank whose slice is empty only adds zeros
            loss.backward()
        dp.sum_grads(params)
        loop.finish_step(step, params, {"epoch": step // schedule.steps_per_epoch, "loss": dp.sum(loss).item(),
                                        "tokens": int(tokens)})
    loop.close()
    model.eval()
    if dp.is_main:
        save_pretrained(model, tokenizer, stage_dir / "model")
    dp.barrier()
    return loop.rows


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """The SFT loss curve."""
    log = metrics.get(NAME, [])
    if not log:
        return []
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    data = (metrics.get(NAME + "_data") or [{}])[-1]
    what = (f"{data['examples']} examples from {data['prompts']} prompts ({data['revision_examples']} revisions, "
            f"{data['sample_examples']} sampled responses of prompts that were not revised); " if data else "")
    return ["## Supervised fine-tuning on the revisions", "",
            f"{what}{len(steps)} optimizer steps; response-token loss {losses[0]:.3f} at the first step, "
            f"{losses[-1]:.3f} at the last (mean of the last {min(3, len(losses))}: "
            f"{sum(losses[-3:]) / len(losses[-3:]):.3f}).", "",
            plot(run, "sft_loss", lambda ax: ax.plot(steps, losses, marker="."), "SFT loss", "step",
                 "NLL per response token"), ""]
