"""sft: fine-tune the policy on the final revisions (the SL-CAI model), loss on response tokens only.

Each example is the prompt followed by the row's `final` text (the last revision; the first response for
prompts that were not revised). The loss is the mean negative log-likelihood of the response tokens,
computed by `cai_kernels.linear_token_logprobs` from the final hidden states and the LM head weight, so
the (tokens x vocabulary) logits are never built. Checkpoints every `save_every` steps let a killed run
resume; the model is saved to sft/model (safetensors). Output rows: the training log (step, loss, tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models import PromptFormat
from ..prompts import rng_for
from ..training import (IGNORE, Checkpoint, encode_dialogue, response_batch, save_pretrained,
                        sequence_token_logprobs, set_trainable)
from .common import Context

NAME = "sft"


@dataclass
class SFTConfig:
    model: str | None = None  # the model to fine-tune; default: the run's base model
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_length: int = 512
    train_layers: int | None = None  # None: all parameters; N: the last N blocks + final norm
    save_every: int = 50  # optimizer steps between resumable checkpoints
    prompt_format: str = "auto"


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def sft(revisions: list[dict], cfg: SFTConfig, ctx: Context) -> list[dict]:
    stage_dir = ctx.run.stage(NAME)
    model, tokenizer = ctx.load(cfg.model)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    examples = [encode_dialogue(fmt, tokenizer, r["prompt"], r["final"], cfg.max_length) for r in revisions]
    params = set_trainable(model, cfg.train_layers)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    checkpoint = Checkpoint(stage_dir)
    start, log, _ = checkpoint.restore({"model": model}, optimizer)
    model.train()
    bar = ctx.tqdm(total=total, initial=start, desc=NAME, unit="step")
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(examples)))
        rng_for(ctx.seed, NAME, "epoch", epoch).shuffle(order)  # the same order when a run resumes
        batch = [examples[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
        ids, mask, targets = (t.to(model.device) for t in response_batch(batch, tokenizer.pad_token_id))
        logprobs = sequence_token_logprobs(model, ids, mask, targets)
        tokens = (targets != IGNORE).sum()
        loss = -logprobs.sum() / tokens.clamp(min=1)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, cfg.lr, cfg.warmup_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "epoch": epoch, "loss": loss.item(), "tokens": int(tokens),
                  "grad_norm": float(grad_norm)}
        log.append(record)
        ctx.run.metrics.log(NAME, step, loss=record["loss"], tokens=record["tokens"], grad_norm=record["grad_norm"])
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            checkpoint.save(step + 1, {"model": model}, optimizer, log)
    bar.close()
    model.eval()
    save_pretrained(model, tokenizer, stage_dir / "model")
    checkpoint.clear()
    return log
