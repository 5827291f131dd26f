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
predicted by the hidden state one position earlier. A checkpoint every `save_every` iterations makes the
stage resumable. Saves ppo/model (+ value_head.safetensors). Output rows: every rollout (iteration, id,
prompt, response, score, kl).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cai_kernels

from ..models import PromptFormat, cut_at_stop, encode, generate_ids, lm_head, pad_rows
from ..prompts import rng_for, seed_for
from ..reward import ScalarHead, load_reward_model
from ..training import Checkpoint, save_pretrained, set_trainable, trunk_hidden
from .common import Context

NAME = "ppo"


@dataclass
class PPOConfig:
    model: str | None = None  # policy init; default: the sft stage's model
    reference: str | None = None  # default: the policy init
    reward_model: str | None = None  # default: the train_pm stage's model
    steps: int = 20  # PPO iterations (rollout + update)
    rollout_batch_size: int = 8
    minibatch_size: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-6
    value_lr: float = 1e-4  # the value head's learning rate
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten: bool = True
    max_grad_norm: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    train_layers: int | None = None
    save_every: int = 1
    prompt_format: str = "auto"


def _scalar(value) -> float:
    return value.detach().float().mean().item() if torch.is_tensor(value) else float(value)


def policy_outputs(policy, value_head, seq, attention_mask, prompt_width, *, with_values=True):
    """(log-probs (B, Tr), values (B, Tr) or None) of the response block seq[:, prompt_width:]."""
    hidden = trunk_hidden(policy, seq, attention_mask)[:, prompt_width - 1:-1]
    weight, bias = lm_head(policy)
    logprobs = cai_kernels.linear_token_logprobs(hidden, weight, seq[:, prompt_width:], bias=bias)
    return logprobs, value_head(hidden) if with_values else None


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
    start, rollouts, _ = checkpoint.restore(modules, optimizer)
    pad = tokenizer.pad_token_id
    bar = ctx.tqdm(total=cfg.steps, initial=start, desc=NAME, unit="iter")
    for it in range(start, cfg.steps):
        batch = rng_for(ctx.seed, NAME, "prompts", it).sample(prompts, min(cfg.rollout_batch_size, len(prompts)))
        policy.eval()
        prompt_ids = [encode(tokenizer, fmt.render(fmt.conversation(r["prompt"]), next_role="assistant"))
                      for r in batch]
        responses = generate_ids(policy, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=seed_for(ctx.seed, NAME, it))
        responses = [r or [tokenizer.eos_token_id] for r in responses]
        prompt_block, prompt_mask = pad_rows(prompt_ids, pad, left=True)
        response_block, response_mask = pad_rows(responses, pad, left=False)
        width = prompt_block.shape[1]
        seq = torch.cat([prompt_block, response_block], 1).to(policy.device)
        attention = torch.cat([prompt_mask, response_mask], 1).to(policy.device)
        response_mask = response_mask.to(policy.device)
        texts = [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), fmt.stop_strings()) for r in responses]
        with torch.no_grad():
            old_logprobs, old_values = policy_outputs(policy, value_head, seq, attention, width)
            ref_logprobs, _ = policy_outputs(reference, value_head, seq, attention, width, with_values=False)
            scores = torch.tensor(pm.score([r["prompt"] for r in batch], texts), dtype=torch.float32,
                                  device=policy.device)
            advantages, returns, token_rewards, kl = cai_kernels.ppo_advantages(
                scores, old_logprobs, ref_logprobs, old_values, response_mask, kl_coef=cfg.kl_coef,
                gamma=cfg.gamma, lam=cfg.lam, estimator=cfg.kl_estimator, whiten=cfg.whiten)
        policy.train()
        stats_sum, updates = {}, 0
        for epoch in range(cfg.ppo_epochs):
            order = list(range(len(batch)))
            rng_for(ctx.seed, NAME, "minibatch", it, epoch).shuffle(order)
            for mb_start in range(0, len(order), cfg.minibatch_size):
                mb = torch.tensor(order[mb_start:mb_start + cfg.minibatch_size], device=policy.device)
                logprobs, values = policy_outputs(policy, value_head, seq[mb], attention[mb], width)
                pg_loss, pg_stats = cai_kernels.ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                response_mask[mb], clip_low=cfg.clip,
                                                                clip_high=cfg.clip)
                vf_loss, vf_clipfrac = cai_kernels.ppo_value_loss(values, old_values[mb], returns[mb],
                                                                  response_mask[mb], clip=cfg.value_clip)
                loss = pg_loss + cfg.vf_coef * vf_loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params + list(value_head.parameters()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "vf_clipfrac": _scalar(vf_clipfrac)}
                step_stats.update({k: _scalar(v) for k, v in pg_stats.items()})
                for k, v in step_stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v
                updates += 1
        kl_per_seq = (kl * response_mask).sum(-1)
        record = {"score": scores.mean().item(), "kl": kl_per_seq.mean().item(),
                  "reward": (scores - cfg.kl_coef * kl_per_seq).mean().item(),
                  "response_tokens": response_mask.sum(-1).float().mean().item()}
        record.update({k: v / max(updates, 1) for k, v in stats_sum.items()})
        ctx.run.metrics.log(NAME, it, **record)
        rollouts.extend({"iteration": it, "id": r["id"], "prompt": r["prompt"], "response": text, "score": s, "kl": k}
                        for r, text, s, k in zip(batch, texts, scores.tolist(), kl_per_seq.tolist()))
        bar.update(1)
        bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        if (it + 1) % cfg.save_every == 0 and it + 1 < cfg.steps:
            checkpoint.save(it + 1, modules, optimizer, rollouts)
    bar.close()
    policy.eval()
    save_pretrained(policy, tokenizer, stage_dir / "model",
                    extra={"weight": value_head.weight, "bias": value_head.bias}, extra_name="value_head.safetensors")
    checkpoint.clear()
    return rollouts
