"""train_pm: the preference model (backbone + scalar head) trained on the soft AI labels.

Loss: `cai_kernels.reward_pairwise_loss` on the final hidden states of (prompt, response_a) and
(prompt, response_b) with soft_labels = p_a: -(p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a)),
the reward read at each dialogue's last real token. A seeded `heldout_fraction` of the pairs is kept out;
held-out accuracy = share of those pairs (p_a != 0.5) where sign(r_a - r_b) agrees with p_a > 0.5.
The PM is saved to train_pm/model. Output rows: the held-out pairs with both rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cai_kernels

from ..prompts import rng_for
from ..reward import RewardModel
from ..training import Checkpoint, set_trainable
from .common import Context, EpochSchedule
from .sft import warmup_lr

NAME = "train_pm"


@dataclass
class TrainPMConfig:
    model: str | None = None  # the PM's backbone init; default: the run's base model
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8  # pairs per step
    lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_length: int = 512
    heldout_fraction: float = 0.2
    train_layers: int | None = None  # None: all parameters; N: the last N blocks + final norm
    save_every: int = 50
    prompt_format: str = "auto"


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    rng_for(seed, NAME, "split").shuffle(order)
    held = round(fraction * len(rows)) if len(rows) > 1 else 0
    held = min(max(held, 1 if fraction > 0 and len(rows) > 1 else 0), len(rows) - 1) if rows else 0
    return [rows[i] for i in sorted(order[held:])], [rows[i] for i in sorted(order[:held])]


def pair_loss(pm: RewardModel, rows: list[dict], max_length: int):
    """(loss, rewards_a, rewards_b) of a batch of labelled pairs."""
    prompts = [r["prompt"] for r in rows]
    ids, mask = pm.encode(prompts + prompts, [r["response_a"] for r in rows] + [r["response_b"] for r in rows],
                          max_length)
    hidden = pm.hidden(ids, mask)
    n = len(rows)
    soft = torch.tensor([r["p_a"] for r in rows], dtype=torch.float32, device=hidden.device)
    return cai_kernels.reward_pairwise_loss(hidden[:n], mask[:n], hidden[n:], mask[n:], pm.head.weight,
                                            pm.head.bias, soft_labels=soft)


def agreement(rewards_a, rewards_b, rows) -> tuple[int, int]:
    """(pairs where the PM's preference agrees with the label's, pairs with a preference in the label)."""
    decided = [(float(a) > float(b)) == (r["p_a"] > 0.5) for a, b, r in zip(rewards_a, rewards_b, rows)
               if r["p_a"] != 0.5]
    return sum(decided), len(decided)


def train_pm(labels: list[dict], cfg: TrainPMConfig, ctx: Context) -> list[dict]:
    stage_dir = ctx.run.stage(NAME)
    lm, tokenizer = ctx.load(cfg.model)
    pm = RewardModel(lm, tokenizer, prompt_format=cfg.prompt_format)
    train_rows, held_rows = split_heldout(labels, cfg.heldout_fraction, ctx.seed)
    params = set_trainable(lm, cfg.train_layers)
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lr},
                                   {"params": list(pm.head.parameters()), "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
    schedule = EpochSchedule(len(train_rows), cfg.batch_size, cfg.epochs, cfg.max_steps, ctx.seed, NAME)
    total = schedule.total
    checkpoint = Checkpoint(stage_dir)
    start, log, _ = checkpoint.restore({"lm": lm, "head": pm.head}, optimizer)
    dp = ctx.dp  # data-parallel ranks (cai.scaleout.data_parallel): each takes a slice of every batch
    lm.train()
    bar = ctx.tqdm(total=total, initial=start, desc=NAME, unit="step")
    for step in range(start, total):
        batch = [train_rows[i] for i in schedule.indices(step)]
        local = dp.shard(batch)
        loss, agree, decided = torch.zeros((), device=lm.device), 0, 0
        if local:
            local_loss, rewards_a, rewards_b = pair_loss(pm, local, cfg.max_length)
            # the slice's share of the batch's mean loss: summed over ranks, the one-process loss
            loss = local_loss * (len(local) / len(batch)) if dp.enabled else local_loss
            agree, decided = agreement(rewards_a.tolist(), rewards_b.tolist(), local)
        if loss.requires_grad:
            loss.backward()
        dp.sum_grads(params + list(pm.head.parameters()))
        grad_norm = torch.nn.utils.clip_grad_norm_(params + list(pm.head.parameters()), cfg.max_grad_norm)
        optimizer.param_groups[0]["lr"] = warmup_lr(step, cfg.lr, cfg.warmup_steps)
        optimizer.param_groups[1]["lr"] = warmup_lr(step, cfg.head_lr, cfg.warmup_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        agree, decided = int(dp.sum(agree)), int(dp.sum(decided))
        record = {"step": step, "loss": dp.sum(loss).item(), "train_accuracy": agree / decided if decided else None,
                  "grad_norm": float(grad_norm)}
        log.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if not dp.is_main:
            continue
        ctx.run.metrics.log(NAME, step, **{k: v for k, v in record.items() if k != "step"})
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            checkpoint.save(step + 1, {"lm": lm, "head": pm.head}, optimizer, log)
    bar.close()
    lm.eval()
    held = []
    with torch.no_grad():
        for start_row in range(0, len(held_rows), cfg.batch_size):
            local = dp.shard(held_rows[start_row:start_row + cfg.batch_size])
            scored = []
            if local:
                loss, rewards_a, rewards_b = pair_loss(pm, local, cfg.max_length)
                for row, a, b in zip(local, rewards_a.tolist(), rewards_b.tolist()):
                    scored.append({"id": row["id"], "prompt": row["prompt"], "response_a": row["response_a"],
                                   "response_b": row["response_b"], "p_a": row["p_a"], "reward_a": a, "reward_b": b,
                                   "agrees": (a > b) == (row["p_a"] > 0.5) if row["p_a"] != 0.5 else None})
            held.extend(r for part in dp.gather(scored) for r in part)  # rank order = batch order
    agree, decided = agreement([h["reward_a"] for h in held], [h["reward_b"] for h in held], held)
    if dp.is_main:
        ctx.run.metrics.log(NAME, total, heldout_accuracy=agree / decided if decided else None,
                            heldout_pairs=len(held), train_pairs=len(train_rows))
        pm.save(stage_dir / "model")
    dp.barrier()
    return held
