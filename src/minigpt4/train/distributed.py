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


def wrap_fsdp(module: nn.Module, llm: nn.Module, ctx: DistContext) -> nn.Module:
    """FSDP2 for LLMs that do not fit one device: shard every frozen weight across the processes.

    Each decoder layer of `llm` (the classes its `_no_split_modules` names) is one FSDP unit,
    gathered just before it runs and freed right after, and so is each block of the frozen towers
    (transformers' `Blip2EncoderLayer` of the ViT, `Blip2QFormerLayer` of a frozen Q-Former), so the
    1B-parameter ViT is never gathered whole; everything else that is frozen (patch embedding,
    ln_vision, embeddings, final norm, head) goes into the root unit. Call this with `module` on the CPU:
    FSDP moves only each process's shard to `ctx.device`. The trainable parameters are left out of
    FSDP (replicated, moved here, synchronised by `all_reduce_gradients`), so the optimizer and the
    checkpoints see plain tensors, as with DDP.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer, Blip2QFormerLayer

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    layer_classes = set(getattr(llm, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(llm).__name__} does not name its decoder layer class (_no_split_modules); "
                         "train.strategy=fsdp cannot split it, use train.strategy=ddp")
    trainable = {p for p in module.parameters() if p.requires_grad}
    layers = [m for m in llm.modules() if type(m).__name__ in layer_classes]
    # A trainable Q-Former stays replicated with the other trainable weights: only frozen blocks become units.
    tower_blocks = [m for m in module.modules() if isinstance(m, (Blip2EncoderLayer, Blip2QFormerLayer))
                    and not any(p.requires_grad for p in m.parameters())]
    for layer in [*layers, *tower_blocks]:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh, ignored_params=trainable)
    for param in trainable:
        param.data = param.data.to(ctx.device)
    log.info("FSDP: %d LLM layers, %d tower blocks and the other frozen weights sharded over %d processes; "
             "%d trainable tensors replicated", len(layers), len(tower_blocks), ctx.world_size, len(trainable))
    return module


def all_reduce_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of `params` over all processes (what DDP does, for FSDP's ignored parameters)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
