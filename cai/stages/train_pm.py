"""train_pm: the preference model (backbone + scalar head) trained on the soft AI labels.

Loss: `cai_kernels.reward_pairwise_loss` on the final hidden states of (prompt, response_a) and
(prompt, response_b) with soft_labels = p_a: -(p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a)),
the reward read at each dialogue's last real token. A seeded `heldout_fraction` of the pairs is kept out;
held-out accuracy = share of those pairs (p_a != 0.5) where sign(r_a - r_b) agrees with p_a > 0.5.
The PM is saved to train_pm/model. Output rows: the held-out pairs with both rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import cai_kernels

from ..prompts import rng_for
from ..reward import RewardModel
from ..reporting import format_value, plot
from ..rundir import RunDir
from ..training import set_trainable
from .common import Context, EpochSchedule
from .training_loop import TrainingLoop

NAME = "train_pm"


@dataclass
class TrainPMConfig:
    model: str | None = None  # the PM's backbone init; default: the run's base model
    epochs: int = field(default=1, metadata={"ge": 1})
    max_steps: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int = field(default=8, metadata={"ge": 1})  # pairs per step
    lr: float = field(default=1e-5, metadata={"ge": 0})
    head_lr: float = field(default=1e-3, metadata={"ge": 0})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0})
    max_length: int = field(default=512, metadata={"ge": 2})  # tokens of prompt + response
    heldout_fraction: float = field(default=0.2, metadata={"ge": 0, "lt": 1})
    # None: all parameters; N: the last N blocks + final norm
    train_layers: int | None = field(default=None, metadata={"ge": 0})
    save_every: int = field(default=50, metadata={"ge": 1})
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


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
    loop = TrainingLoop(ctx, NAME, modules={"lm": lm, "head": pm.head}, optimizer=optimizer, total=schedule.total,
                        save_every=cfg.save_every, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm)
    trained = params + list(pm.head.parameters())
    dp = ctx.dp  # data-parallel ranks (cai.scaleout.data_parallel): each takes a slice of every batch
    lm.train()
    for step in loop.steps():
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
        dp.sum_grads(trained)
        agree, decided = int(dp.sum(agree)), int(dp.sum(decided))
        loop.finish_step(step, trained, {"loss": dp.sum(loss).item(),
                                         "train_accuracy": agree / decided if decided else None})
    loop.close()
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
        ctx.run.metrics.log(NAME, schedule.total, heldout_accuracy=agree / decided if decided else None,
                            heldout_pairs=len(held), train_pairs=len(train_rows))
        pm.save(stage_dir / "model")
    dp.barrier()
    return held


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """The PM's loss curve and held-out accuracy."""
    log = [r for r in metrics.get(NAME, []) if "loss" in r]
    final = [r for r in metrics.get(NAME, []) if "heldout_accuracy" in r]
    if not log and not final:
        return []
    out = ["## Preference model", ""]
    if log:
        steps = [r["step"] for r in log]
        losses = [r["loss"] for r in log]
        out += [f"{len(steps)} steps of the soft-label pairwise loss: {losses[0]:.4f} at the first step, "
                f"{losses[-1]:.4f} at the last.", "",
                plot(run, "pm_loss", lambda ax: ax.plot(steps, losses, marker="."), "PM training loss", "step",
                     "pairwise loss"), ""]
    if final:
        f = final[-1]
        out += [f"Held-out accuracy (agreement with the AI label's preferred response): "
                f"**{format_value(f.get('heldout_accuracy'))}** on {f.get('heldout_pairs')} held-out pairs "
                f"({f.get('train_pairs')} used for training).", ""]
    return out
