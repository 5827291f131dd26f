"""Data parallelism for the training stages (sft, train_pm, ppo) under torchrun / accelerate launch.

Launched by ``torchrun --nproc_per_node N -m cai.cli sft ...`` (or ``accelerate launch --num_processes
N -m cai.cli ...``: both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), every rank
runs the stage on its own slice of each global batch:

  * the global batch is drawn exactly as in one process (same seeded order on every rank) and cut
    into contiguous slices, one per rank;
  * each rank's loss is its slice's *sum* divided by the global count (tokens, pairs), so the
    losses add up over ranks to the one-process loss; gradients are summed with all_reduce, so
    every rank holds the one-process gradient, clips it the same way and takes the same optimizer
    step (the replicas never drift apart, no parameter broadcast is needed);
  * rank 0 alone writes metrics, checkpoints, models and datasets.
This is DDP's arithmetic done explicitly (one flat all_reduce per step): the stages call the
model's trunk directly (hidden states feed the fused kernels), which torch's DDP wrapper would not
see. Backend: NCCL for CUDA, gloo otherwise. One process (no WORLD_SIZE): everything is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# the non-data-parallel stages run on rank 0 while the others wait in a barrier: give them time
_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DataParallel":
        """The launch's ranks, joining (or starting) the default process group when WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            use_cuda = torch.cuda.is_available() and os.environ.get("CAI_DIST_BACKEND", "") != "gloo"
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=_TIMEOUT)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list) -> list:
        """This rank's contiguous slice of a global batch (sizes differ by at most one; may be empty)."""
        if not self.enabled:
            return rows
        base, extra = divmod(len(rows), self.world)
        start = self.rank * base + min(self.rank, extra)
        return rows[start:start + base + (1 if self.rank < extra else 0)]

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """Sum over ranks, as a new detached tensor (fp64 0-d for a number)."""
        tensor = value.detach().clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        if self.enabled:
            import torch.distributed as dist

            on_device = tensor.to(self._device())
            dist.all_reduce(on_device)
            tensor = on_device.to(tensor.device)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (one flat all_reduce); missing grads count as 0."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(self._device(), torch.float32) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled; for small things such as token lists)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
