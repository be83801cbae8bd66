"""torch.distributed set-up for `torchrun`, and DDP that synchronises only the trainable weights.

`torchrun --nproc_per_node N` (or multi-node with its rendezvous flags) sets RANK, WORLD_SIZE and
LOCAL_RANK; without them the run is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str, device: str) -> DistContext:
    """Join the process group that torchrun describes, and pick this process's device.

    With a CUDA (or other accelerator) `device`, process `LOCAL_RANK` uses accelerator index
    LOCAL_RANK; `backend="auto"` means nccl on CUDA and gloo otherwise.
    """
    base = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(device=base)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type != "cpu":
        base = torch.device(base.type, local_rank)
        getattr(torch, base.type).set_device(base)
    if backend == "auto":
        backend = "nccl" if base.type == "cuda" else "gloo"
    if backend == "nccl" and base.type != "cuda":
        raise ValueError(f"train.backend=nccl needs model.device=cuda, got {device!r}; use train.backend=gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30),
            device_id=base if base.type == "cuda" else None,
        )
    log.info("process %d of %d (local rank %d) on %s, backend %s", rank, world_size, local_rank, base, backend)
    return DistContext(rank, world_size, local_rank, base)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of `value` over all processes (returned; the argument is left alone)."""
    value = value.detach().clone()
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """`obj` from every process, indexed by rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every process."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over the trainable parameters of `module` only.

    Frozen parameters and all buffers are excluded from DDP's start-up broadcast and from gradient
    buckets: every process builds the same frozen towers from the same files (or seed), and
    broadcasting a 13B LLM for nothing would cost minutes.
    """
    if not ctx.enabled:
        return module
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
