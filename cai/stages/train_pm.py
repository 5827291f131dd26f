"""train_pm: the hybrid preference model (backbone + scalar head): AI harmlessness labels + human helpfulness.

Two kinds of comparisons, as in the paper's PM (182k AI-labelled harmlessness comparisons + 135k human
helpfulness comparisons):
  * harmless: the label stage's pairs, soft labels p_a (the feedback model's probability that response_a is
    the less harmful one);
  * helpful: human comparisons from `helpful_data` (`cai.data.load_comparisons`: prompt / chosen / rejected
    rows or hh-rlhf transcripts; builtin:helpful_pairs is our own small set), hard labels (chosen = response_a,
    p_a = 1.0).
Every batch holds round(batch_size x helpful_fraction) helpful pairs and the rest harmless ones (MixedSchedule;
a kind with no pairs leaves the whole batch to the other). Loss: `cai_kernels.reward_pairwise_loss` on the
final hidden states of (prompt, response_a) and (prompt, response_b) with soft_labels = p_a:
-(p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a)), the reward read at each dialogue's last real token.
A seeded `heldout_fraction` of each kind is kept out; held-out accuracy = share of those pairs (p_a != 0.5) where
sign(r_a - r_b) agrees with p_a > 0.5, reported per kind. The PM is saved to train_pm/model.
Output rows: the held-out pairs with both rewards and their kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import cai_kernels

from ..data import load_comparisons
from ..prompts import rng_for
from ..reward import RewardModel
from ..reporting import format_value, plot, stage_rows
from ..rundir import RunDir
from ..stats import wilson_interval
from ..training import set_trainable
from .common import Context, MixedSchedule
from .training_loop import TrainingLoop

NAME = "train_pm"
KINDS = ("harmless", "helpful")


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
    heldout_fraction: float = field(default=0.2, metadata={"ge": 0, "lt": 1})  # of each kind
    # human helpfulness comparisons (hard labels): files / builtin:helpful_pairs / hf:NAME[:SPLIT[:DATA_DIR]]
    helpful_data: list[str] = field(default_factory=lambda: ["builtin:helpful_pairs"], metadata={"unique": True})
    helpful_limit: int | None = field(default=None, metadata={"ge": 1})  # first N comparisons of each source
    # share of every batch from the helpful comparisons (paper: 135k of 318k)
    helpful_fraction: float = field(default=0.43, metadata={"ge": 0, "le": 1})
    # None: all parameters; N: the last N blocks + final norm
    train_layers: int | None = field(default=None, metadata={"ge": 0})
    save_every: int = field(default=50, metadata={"ge": 1})
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def pm_pairs(labels: list[dict], cfg: TrainPMConfig, ctx: Context) -> dict[str, list[dict]]:
    """{"harmless": the AI-labelled pairs, "helpful": the human comparisons}, as rows {"id", "prompt",
    "response_a", "response_b", "p_a", "pair_kind"}."""
    harmless = [{"id": r["id"], "prompt": r["prompt"], "response_a": r["response_a"], "response_b": r["response_b"],
                 "p_a": float(r["p_a"]), "pair_kind": "harmless"} for r in labels]
    helpful, dropped = [], 0
    if cfg.helpful_data and cfg.helpful_fraction > 0:
        comparisons, dropped = load_comparisons(cfg.helpful_data, limit_per_source=cfg.helpful_limit,
                                                allow_download=ctx.allow_download)
        helpful = [{"id": c["id"], "prompt": c["prompt"], "response_a": c["chosen"], "response_b": c["rejected"],
                    "p_a": 1.0, "pair_kind": "helpful"} for c in comparisons]
    if ctx.dp.is_main:
        ctx.run.metrics.log(NAME + "_data", 0, harmless_pairs=len(harmless), helpful_pairs=len(helpful),
                            helpful_dropped=dropped)
    return {"harmless": harmless, "helpful": helpful}


def batch_counts(batch_size: int, helpful_fraction: float, available: dict[str, int]) -> dict[str, int]:
    """Pairs of each kind per batch: round(batch_size x helpful_fraction) helpful (at least 1 and at most
    batch_size - 1 when both kinds have pairs), the rest harmless; a kind without pairs gives its share away."""
    if not 0.0 <= helpful_fraction <= 1.0:
        raise ValueError(f"train_pm.helpful_fraction must be in [0, 1]; got {helpful_fraction}")
    if not available.get("helpful") or helpful_fraction == 0:
        return {"harmless": batch_size, "helpful": 0}
    if not available.get("harmless") or helpful_fraction == 1:
        return {"harmless": 0, "helpful": batch_size}
    helpful = min(max(round(batch_size * helpful_fraction), 1), batch_size - 1)
    return {"harmless": batch_size - helpful, "helpful": helpful}


def split_heldout(rows: list[dict], fraction: float, seed: int, kind: str = "") -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded `fraction` of `rows` held out (at least one when there are two)."""
    order = list(range(len(rows)))
    rng_for(seed, NAME, "split", *([kind] if kind else [])).shuffle(order)
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
    pairs = pm_pairs(labels, cfg, ctx)
    train_rows, held_rows = {}, []
    for kind in KINDS:
        train_rows[kind], held = split_heldout(pairs[kind], cfg.heldout_fraction, ctx.seed, kind)
        held_rows += held
    counts = batch_counts(cfg.batch_size, cfg.helpful_fraction, {k: len(v) for k, v in train_rows.items()})
    schedule = MixedSchedule({k: len(v) for k, v in train_rows.items()}, counts, cfg.epochs, cfg.max_steps, ctx.seed,
                             NAME)
    lm, tokenizer = ctx.load(cfg.model)
    pm = RewardModel(lm, tokenizer, prompt_format=cfg.prompt_format)
    params = set_trainable(lm, cfg.train_layers)
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lr},
                                   {"params": list(pm.head.parameters()), "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
    loop = TrainingLoop(ctx, NAME, modules={"lm": lm, "head": pm.head}, optimizer=optimizer, total=schedule.total,
                        save_every=cfg.save_every, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm)
    trained = params + list(pm.head.parameters())
    dp = ctx.dp  # data-parallel ranks (cai.scaleout.data_parallel): each takes a slice of every batch
    lm.train()
    for step in loop.steps():
        batch = [train_rows[kind][i] for kind, i in schedule.indices(step)]
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
                                         "train_accuracy": agree / decided if decided else None,
                                         **{f"batch_{kind}": sum(r["pair_kind"] == kind for r in batch)
                                            for kind in KINDS}})
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
                    scored.append({"id": row["id"], "pair_kind": row["pair_kind"], "prompt": row["prompt"],
                                   "response_a": row["response_a"], "response_b": row["response_b"], "p_a": row["p_a"],
                                   "reward_a": a, "reward_b": b,
                                   "agrees": (a > b) == (row["p_a"] > 0.5) if row["p_a"] != 0.5 else None})
            held.extend(r for part in dp.gather(scored) for r in part)  # rank order = batch order
    if dp.is_main:
        record = {"train_pairs": sum(len(v) for v in train_rows.values()), "heldout_pairs": len(held),
                  "batch_harmless": counts["harmless"], "batch_helpful": counts["helpful"]}
        for kind in (None,) + KINDS:
            chosen = [h for h in held if kind is None or h["pair_kind"] == kind]
            agree, decided = agreement([h["reward_a"] for h in chosen], [h["reward_b"] for h in chosen], chosen)
            suffix = "" if kind is None else f"_{kind}"
            record[f"heldout_accuracy{suffix}"] = agree / decided if decided else None
            record[f"heldout_decided{suffix}"] = decided
            if kind is not None:
                record[f"train_pairs_{kind}"] = len(train_rows[kind])
        ctx.run.metrics.log(NAME, schedule.total, **record)
        pm.save(stage_dir / "model")
    dp.barrier()
    return held


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """The PM's data, loss curve and held-out accuracy per kind (with 95 % Wilson intervals)."""
    log = [r for r in metrics.get(NAME, []) if "loss" in r]
    final = [r for r in metrics.get(NAME, []) if "heldout_accuracy" in r]
    if not log and not final:
        return []
    out = ["## Preference model", ""]
    data = (metrics.get(NAME + "_data") or [{}])[-1]
    if data:
        out += [f"Hybrid data: {data['harmless_pairs']} AI-labelled harmlessness pairs (soft labels) and "
                f"{data['helpful_pairs']} human helpfulness comparisons (hard labels"
                + (f"; {data['helpful_dropped']} rows dropped" if data.get("helpful_dropped") else "") + ").", ""]
    if final and final[-1].get("batch_helpful") is not None:
        f = final[-1]
        out += [f"Every batch: {f['batch_harmless']} harmless + {f['batch_helpful']} helpful pairs.", ""]
    if log:
        steps = [r["step"] for r in log]
        losses = [r["loss"] for r in log]
        out += [f"{len(steps)} steps of the pairwise loss: {losses[0]:.4f} at the first step, "
                f"{losses[-1]:.4f} at the last.", "",
                plot(run, "pm_loss", lambda ax: ax.plot(steps, losses, marker="."), "PM training loss", "step",
                     "pairwise loss"), ""]
    if final:
        f = final[-1]
        held = stage_rows(run, NAME)
        out += ["Held-out accuracy (share of held-out pairs where the PM prefers the labelled better response; "
                "95 % Wilson interval), next to a baseline that prefers the longer response:", "",
                "| pairs | labels | n | accuracy | 95 % CI | longer-response baseline |",
                "| --- | --- | --- | --- | --- | --- |"]
        for kind, labels in (("harmless", "AI (soft)"), ("helpful", "human (hard)"), (None, "all")):
            suffix = "" if kind is None else f"_{kind}"
            acc, n = f.get(f"heldout_accuracy{suffix}"), f.get(f"heldout_decided{suffix}") or 0
            lo, hi = wilson_interval(round(acc * n), n) if acc is not None and n else (None, None)
            out.append(f"| {kind or 'both kinds'} | {labels} | {n} | {format_value(acc)} | "
                       f"{format_value(lo)}–{format_value(hi)} | {format_value(longer_baseline(held, kind))} |")
        out.append("")
    return out


def longer_baseline(held: list[dict], kind: str | None) -> float | None:
    """Accuracy on the held-out pairs of `kind` (None: all) of preferring the longer response: what a PM that
    learned only length would score."""
    decided = [h for h in held if (kind is None or h.get("pair_kind") == kind) and h["p_a"] != 0.5
               and len(h["response_a"]) != len(h["response_b"])]
    if not decided:
        return None
    return sum((len(h["response_a"]) > len(h["response_b"])) == (h["p_a"] > 0.5) for h in decided) / len(decided)
