"""ppo: RL from AI feedback. Policy (from the SL model) + value head, reference = the SL model, reward = PM.

One iteration:
  1. rollout: sample responses to a seeded draw of `rollout_batch_size` prompts;
  2. score: old log-probs and values of the policy, log-probs of the frozen reference, PM score of each
     (prompt, response); log-probs come from `cai_kernels.linear_token_logprobs` on the final hidden
     states and the LM head weight;
  3. `cai_kernels.ppo_advantages`: per-token rewards = -kl_coef * KL(policy || reference) with the PM score
     added at each response's last token, then GAE (gamma, lam) and whitened advantages;
  4. `ppo_epochs` passes over shuffled minibatches of `cai_kernels.ppo_policy_loss` (clipped ratio) +
     vf_coef * `cai_kernels.ppo_value_loss` (clipped values).
Tensor layout: [prompt, left-padded | response, right-padded]; position t of the response block is
predicted by the hidden state one position earlier. Log-probs (old, reference, new) are taken at the sampling
temperature `temperature`: the old ones are then the sampler's own log-probs of its tokens. A checkpoint every
`save_every` iterations makes the stage resumable; `snapshot_every` keeps the policy's trainable weights every N
iterations (ppo/snapshots/) for the evaluation's Elo along RL training. Saves ppo/model (+ value_head.safetensors).
Output rows: every rollout (iteration, id, prompt, response, score, kl).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cai_kernels
from cai_kernels.reference.kl_penalty import ESTIMATORS

from ..models import PromptFormat, cut_at_stop, encode, fit_generation, generate_ids, lm_head, pad_rows
from ..prompts import rng_for, seed_for
from ..reporting import format_value, plot
from ..reward import ScalarHead, load_reward_model
from ..rundir import RunDir, atomic_write_text
from ..training import Checkpoint, save_pretrained, set_trainable, trunk_hidden
from ..scaleout.data_parallel import DataParallel
from .common import Context

NAME = "ppo"


@dataclass
class PPOConfig:
    model: str | None = None  # policy init; default: the sft stage's model
    reference: str | None = None  # default: the policy init
    reward_model: str | None = None  # default: the train_pm stage's model
    steps: int = field(default=20, metadata={"ge": 1})  # PPO iterations (rollout + update)
    rollout_batch_size: int = field(default=8, metadata={"ge": 1})
    minibatch_size: int = field(default=4, metadata={"ge": 1})
    ppo_epochs: int = field(default=2, metadata={"ge": 1})
    lr: float = field(default=1e-6, metadata={"ge": 0})
    value_lr: float = field(default=1e-4, metadata={"ge": 0})  # the value head's learning rate
    kl_coef: float = field(default=0.05, metadata={"ge": 0})
    kl_estimator: str = field(default="k1", metadata={"choices": tuple(ESTIMATORS)})
    gamma: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    lam: float = field(default=0.95, metadata={"ge": 0, "le": 1})
    clip: float = field(default=0.2, metadata={"ge": 0, "lt": 1})
    value_clip: float = field(default=0.2, metadata={"ge": 0})
    vf_coef: float = field(default=0.1, metadata={"ge": 0})
    whiten: bool = True
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0})
    max_new_tokens: int = field(default=64, metadata={"ge": 1})
    # the sampling temperature; old / reference / new log-probs are taken at it too (0: greedy, scored at 1)
    temperature: float = field(default=1.0, metadata={"ge": 0})
    # < 1 truncates the sampler: its log-probs then differ from the scored ones
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    train_layers: int | None = field(default=None, metadata={"ge": 0})
    save_every: int = field(default=1, metadata={"ge": 1})
    # keep the policy every N iterations (ppo/snapshots/) for the evaluation's Elo along RL
    snapshot_every: int | None = field(default=None, metadata={"ge": 1})
    prompt_format: str = field(default="auto", metadata={"choices": ("auto", "chat", "raw")})


def sampling_temperature(cfg: "PPOConfig") -> float:
    """The temperature the rollout's log-probs are taken at: the sampling temperature. Greedy rollouts
    (temperature 0, deterministic, for tests) have no sampling distribution of their own and are scored at 1."""
    if cfg.temperature < 0:
        raise ValueError(f"ppo.temperature must be >= 0; got {cfg.temperature}")
    return cfg.temperature if cfg.temperature > 0 else 1.0


def _scalar(value) -> float:
    return value.detach().float().mean().item() if torch.is_tensor(value) else float(value)


def policy_outputs(policy, value_head, seq, attention_mask, prompt_width, *, temperature: float,
                   with_values=True):
    """(log-probs (B, Tr), values (B, Tr) or None) of the response block seq[:, prompt_width:].

    The log-probs are those of softmax(logits / temperature), the distribution the rollout sampled from (with
    top_p = 1), so that the old, reference and new log-probs, the KL penalty and the PPO ratio all refer to it.
    """
    hidden = trunk_hidden(policy, seq, attention_mask)[:, prompt_width - 1:-1]
    weight, bias = lm_head(policy)
    logprobs = cai_kernels.linear_token_logprobs(hidden, weight, seq[:, prompt_width:], bias=bias,
                                                 temperature=temperature)
    return logprobs, value_head(hidden) if with_values else None


@dataclass
class Rollout:
    """One iteration's samples, scored. Tensors are (B, Tp + Tr) for seq / attention, (B, Tr) otherwise."""
    seq: torch.Tensor
    attention: torch.Tensor
    prompt_width: int
    response_mask: torch.Tensor
    texts: list[str]
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor  # (B,) PM scores


def gather_rows(dp: DataParallel, local: torch.Tensor) -> torch.Tensor:
    """The rows every rank computed for its slice, concatenated in rank order (= batch order)."""
    if not dp.enabled:
        return local
    return torch.cat([part.to(local.device) for part in dp.gather(local.cpu())])


@torch.no_grad()
def rollout(policy, reference, value_head, pm, tokenizer, fmt, prompts: list[str], cfg: PPOConfig, seed: int,
            dp: DataParallel = DataParallel(), overflow: str = "truncate-left") -> Rollout:
    """Sample a response per prompt from the policy; score it with the policy, the reference and the PM.

    Data-parallel: each rank samples (with its own seed) and scores its slice of the prompts; every
    rank returns the whole batch. Prompts that leave no room for max_new_tokens in the policy's context
    are cut from the left or refused (`overflow`, see cai.models.fit_context).
    """
    policy.eval()
    prompt_ids = [encode(tokenizer, fmt.render(fmt.conversation(p), next_role="assistant")) for p in prompts]
    prompt_ids = fit_generation(policy, prompt_ids, None, cfg.max_new_tokens, overflow)
    local_prompts = dp.shard(prompt_ids)
    local_seed = seed_for(seed, "rank", dp.rank) if dp.enabled else seed
    responses = generate_ids(policy, tokenizer, local_prompts, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=local_seed,
                             overflow=overflow) if local_prompts else []
    responses = [r or [tokenizer.eos_token_id] for part in dp.gather(responses) for r in part]
    prompt_block, prompt_mask = pad_rows(prompt_ids, tokenizer.pad_token_id, left=True)
    response_block, response_mask = pad_rows(responses, tokenizer.pad_token_id, left=False)
    device, width = policy.device, prompt_block.shape[1]
    seq = torch.cat([prompt_block, response_block], 1).to(device)
    attention = torch.cat([prompt_mask, response_mask], 1).to(device)
    texts = [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), fmt.stop_strings()) for r in responses]
    mine = dp.shard(list(range(len(prompts))))
    rows = torch.tensor(mine, dtype=torch.long, device=device) if dp.enabled else slice(None)
    # scored at the sampling temperature: the old log-probs are the sampler's own log-probs of its tokens
    old_logprobs, old_values = policy_outputs(policy, value_head, seq[rows], attention[rows], width,
                                              temperature=sampling_temperature(cfg))
    ref_logprobs, _ = policy_outputs(reference, value_head, seq[rows], attention[rows], width,
                                     temperature=sampling_temperature(cfg), with_values=False)
    scores = torch.tensor(pm.score([prompts[i] for i in mine], [texts[i] for i in mine]), dtype=torch.float32,
                          device=device)
    old_logprobs, old_values, ref_logprobs, scores = (gather_rows(dp, t) for t in
                                                      (old_logprobs, old_values, ref_logprobs, scores))
    return Rollout(seq, attention, width, response_mask.to(device), texts, old_logprobs, old_values, ref_logprobs,
                   scores)


def ppo_update(policy, value_head, optimizer, params, batch: Rollout, advantages, returns, cfg: PPOConfig,
               order_rng, dp: DataParallel = DataParallel()) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value losses over shuffled minibatches; mean stats.

    Data-parallel: each rank takes a slice of every minibatch; its token-mean losses and stats are
    weighted by its share of the minibatch's response tokens, so they sum over ranks (gradients with
    them) to the one-process values.
    """
    policy.train()
    totals, updates = {}, 0
    trained = params + list(value_head.parameters())
    for _ in range(cfg.ppo_epochs):
        order = list(range(batch.seq.shape[0]))
        order_rng.shuffle(order)
        for start in range(0, len(order), cfg.minibatch_size):
            minibatch = order[start:start + cfg.minibatch_size]
            mb = torch.tensor(dp.shard(minibatch), dtype=torch.long, device=batch.seq.device)
            share = 1.0
            if dp.enabled:
                share = (batch.response_mask[mb].sum() / batch.response_mask[minibatch].sum().clamp(min=1)).item()
            stats = dict.fromkeys(("pg_loss", "vf_loss", "vf_clipfrac"), 0.0)
            if len(mb):
                logprobs, values = policy_outputs(policy, value_head, batch.seq[mb], batch.attention[mb],
                                                  batch.prompt_width, temperature=sampling_temperature(cfg))
                pg_loss, pg_stats = cai_kernels.ppo_policy_loss(logprobs, batch.old_logprobs[mb], advantages[mb],
                                                                batch.response_mask[mb], clip_low=cfg.clip,
                                                                clip_high=cfg.clip)
                vf_loss, vf_clipfrac = cai_kernels.ppo_value_loss(values, batch.old_values[mb], returns[mb],
                                                                  batch.response_mask[mb], clip=cfg.value_clip)
                loss = pg_loss + cfg.vf_coef * vf_loss
                (loss * share if dp.enabled else loss).backward()
                stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "vf_clipfrac": _scalar(vf_clipfrac)}
                stats.update({k: _scalar(v) for k, v in pg_stats.items()})
            dp.sum_grads(trained)
            torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dp.enabled:  # every rank records the minibatch's numbers
                parts = dp.gather({k: v * share for k, v in stats.items()})
                stats = {k: sum(part.get(k, 0.0) for part in parts) for k in dict.fromkeys(k for p in parts for k in p)}
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            updates += 1
    return {k: v / max(updates, 1) for k, v in totals.items()}


SNAPSHOTS = "snapshots"


def save_snapshot(policy, stage_dir: Path, iteration: int) -> Path:
    """The policy's trainable parameters after `iteration` iterations, as <stage>/snapshots/iter-NNNNN.safetensors
    (the frozen rest is the policy init's); written atomically."""
    from safetensors.torch import save_file

    folder = Path(stage_dir) / SNAPSHOTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter-{iteration:05d}.safetensors"
    tmp = folder / f".{path.name}.tmp"
    save_file({n: p.detach().contiguous().cpu() for n, p in policy.named_parameters() if p.requires_grad}, str(tmp))
    os.replace(tmp, path)
    return path


def snapshot_init(run_root: Path) -> str:
    """The model spec ("sft", a path, ...) the snapshots' weights go into (the ppo stage's policy init)."""
    path = Path(run_root) / NAME / SNAPSHOTS / "init.txt"
    return path.read_text(encoding="utf-8").strip() if path.is_file() else "sft"


def snapshots(run_root: Path) -> dict[int, Path]:
    """{iteration: path} of the ppo stage's snapshots, in iteration order."""
    folder = Path(run_root) / NAME / SNAPSHOTS
    found = {int(p.stem.split("-")[1]): p for p in folder.glob("iter-*.safetensors")} if folder.is_dir() else {}
    return dict(sorted(found.items()))


def load_snapshot(model, path: Path) -> None:
    """Overwrite `model`'s parameters with those a snapshot holds."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path)).items():
            params[name].copy_(value)


def ppo(prompts: list[dict], cfg: PPOConfig, ctx: Context) -> list[dict]:
    stage_dir = ctx.run.stage(NAME)
    policy, tokenizer = ctx.load(cfg.model, default="sft")
    reference, _ = ctx.load(cfg.reference or cfg.model, default="sft")
    reference.requires_grad_(False)
    pm = load_reward_model(ctx.model_path(cfg.reward_model, "train_pm"), device=ctx.device, dtype=ctx.dtype)
    fmt = PromptFormat(tokenizer, cfg.prompt_format)
    value_head = ScalarHead(policy.config.hidden_size).to(policy.device)
    params = set_trainable(policy, cfg.train_layers)
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lr},
                                   {"params": list(value_head.parameters()), "lr": cfg.value_lr}])
    checkpoint = Checkpoint(stage_dir)
    modules = {"policy": policy, "value_head": value_head}
    start, rollouts, _ = checkpoint.restore(modules, optimizer, repair=ctx.repair)
    dp = ctx.dp  # data-parallel ranks (cai.scaleout.data_parallel): each rolls out and trains on a slice
    if dp.is_main and cfg.snapshot_every:  # the model a snapshot's weights go into: the policy init
        atomic_write_text(stage_dir / SNAPSHOTS / "init.txt", cfg.model or "sft")
    bar = ctx.tqdm(total=cfg.steps, initial=start, desc=NAME, unit="iter")
    for it in range(start, cfg.steps):
        chosen = rng_for(ctx.seed, NAME, "prompts", it).sample(prompts, min(cfg.rollout_batch_size, len(prompts)))
        batch = rollout(policy, reference, value_head, pm, tokenizer, fmt, [r["prompt"] for r in chosen], cfg,
                        seed_for(ctx.seed, NAME, it), dp, overflow=ctx.prompt_overflow)
        with torch.no_grad():
            advantages, returns, _, kl = cai_kernels.ppo_advantages(
                batch.scores, batch.old_logprobs, batch.ref_logprobs, batch.old_values, batch.response_mask,
                kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam, estimator=cfg.kl_estimator, whiten=cfg.whiten)
        stats = ppo_update(policy, value_head, optimizer, params, batch, advantages, returns, cfg,
                           rng_for(ctx.seed, NAME, "minibatches", it), dp)
        kl_per_seq = (kl * batch.response_mask).sum(-1)
        record = {"score": batch.scores.mean().item(), "kl": kl_per_seq.mean().item(),
                  "reward": (batch.scores - cfg.kl_coef * kl_per_seq).mean().item(),
                  "response_tokens": batch.response_mask.sum(-1).float().mean().item(), **stats}
        if dp.is_main:
            ctx.run.metrics.log(NAME, it, **record)
        rollouts.extend({"iteration": it, "id": r["id"], "prompt": r["prompt"], "response": text, "score": s, "kl": k}
                        for r, text, s, k in zip(chosen, batch.texts, batch.scores.tolist(), kl_per_seq.tolist()))
        bar.update(1)
        bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        if dp.is_main and cfg.snapshot_every and (it + 1) % cfg.snapshot_every == 0 and it + 1 < cfg.steps:
            save_snapshot(policy, stage_dir, it + 1)
        if dp.is_main and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.steps:
            checkpoint.save(it + 1, modules, optimizer, rollouts)
    bar.close()
    policy.eval()
    if dp.is_main:
        save_pretrained(policy, tokenizer, stage_dir / "model", extra={"weight": value_head.weight,
                        "bias": value_head.bias}, extra_name="value_head.safetensors")
    dp.barrier()
    return rollouts


def report_section(run: RunDir, metrics: dict[str, list[dict]]) -> list[str]:
    """Per-iteration table, reward and KL curves."""
    log = metrics.get(NAME, [])
    if not log:
        return []
    its = [r["step"] for r in log]
    out = ["## RL from AI feedback (PPO)", "", "| iteration | PM score | KL (per sequence) | reward | "
           "policy loss | value loss | clip fraction |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in log:
        cells = [r["step"], format_value(r.get("score")), format_value(r.get("kl"), 4), format_value(r.get("reward")),
                 format_value(r.get("pg_loss"), 4), format_value(r.get("vf_loss"), 4), format_value(r.get("clipfrac"))]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")

    def draw_reward(ax):
        ax.plot(its, [r["score"] for r in log], marker=".", label="PM score")
        ax.plot(its, [r["reward"] for r in log], marker=".", label="score - kl_coef * KL")
        ax.legend()
    return out + ["", plot(run, "ppo_reward", draw_reward, "PPO reward", "iteration", "mean per rollout"), "",
                  plot(run, "ppo_kl", lambda ax: ax.plot(its, [r["kl"] for r in log], marker=".", color="C3"),
                       "KL(policy || reference)", "iteration", "KL per sequence (nats)"), ""]
