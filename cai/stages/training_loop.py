"""The resumable optimizer-step loop of the training stages (sft, train_pm): restore, step, record, checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from ..training import Checkpoint
from .common import Context


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup from lr / warmup_steps to lr over the first warmup_steps steps, then lr."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


class TrainingLoop:
    """One stage's optimizer steps 0 .. total - 1, resumable from <stage>/checkpoint.

    Made before the loop: restores the last checkpoint of ``modules`` (name -> module; their trainable
    parameters are saved) and ``optimizer``, and opens the progress bar. ``rows`` are the stage's records so
    far (one per step), ``steps()`` the steps left; every step ends with ``finish_step``, ``close()`` ends
    the loop. Each optimizer param group keeps the learning rate it was made with, warmed up linearly.
    """

    def __init__(self, ctx: Context, stage: str, *, modules: dict[str, nn.Module], optimizer, total: int,
                 save_every: int, warmup_steps: int, max_grad_norm: float):
        self.ctx, self.stage, self.modules, self.optimizer = ctx, stage, modules, optimizer
        self.total, self.save_every = total, save_every
        self.warmup_steps, self.max_grad_norm = warmup_steps, max_grad_norm
        # read before a checkpoint's (warmed-up) learning rates replace them
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.checkpoint = Checkpoint(ctx.run.stage(stage))
        self.start, self.rows, _ = self.checkpoint.restore(modules, optimizer, repair=ctx.repair)
        self.bar = ctx.tqdm(total=total, initial=self.start, desc=stage, unit="step")

    def steps(self) -> range:
        return range(self.start, self.total)

    def finish_step(self, step: int, params: list[nn.Parameter], record: dict) -> dict:
        """Clip the gradients of ``params`` (already summed over ranks), take the optimizer step at the
        warmed-up learning rates, and record {"step", **record, "grad_norm"}: appended to ``rows``, shown on
        the bar, and on rank 0 logged to metrics.jsonl and checkpointed every ``save_every`` steps."""
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = warmup_lr(step, lr, self.warmup_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {"step": step, **record, "grad_norm": float(grad_norm)}
        self.rows.append(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        if self.ctx.dp.is_main:
            self.ctx.run.metrics.log(self.stage, step, **{k: v for k, v in record.items() if k != "step"})
            if (step + 1) % self.save_every == 0 and step + 1 < self.total:
                self.checkpoint.save(step + 1, self.modules, self.optimizer, self.rows)
        return record

    def close(self) -> None:
        self.bar.close()
