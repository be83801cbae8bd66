"""What the cache writer and reader agree on: file names, the format version and the staleness fingerprint."""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.tensor import DTensor

from minigpt4.config import ConfigError, TrainJobConfig
from minigpt4.processing.image import ImageTransform, eval_transform, train_transform

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StaleCacheError(ConfigError):
    """The cache was made with other frozen weights, another transform or other datasets than this run's."""


def shard_name(index: int) -> str:
    return f"features-{index:05d}.safetensors"


def data_transform(cfg: TrainJobConfig) -> ImageTransform:
    """The image transform a training job applies: random crops iff data.augment."""
    size = cfg.model.vision.image_size
    return train_transform(size) if cfg.data.augment else eval_transform(size)


def fingerprint(model, transform: ImageTransform) -> str:
    """A hash of everything `model.frozen_features` depends on: frozen weights, transform, dtype.

    Under FSDP the frozen towers are sharded: each tensor is gathered whole (one at a time) before it is
    hashed, so every process gets the fingerprint of the full weights. That gather is a collective, so
    with FSDP every process must call this at the same point, as the training loop does.
    """
    digest = hashlib.blake2b(digest_size=16)
    modules = {"vision": model.vision, "ln_vision": model.ln_vision}
    if model.qformer is None:
        digest.update(b"connector=merge4")  # the same tower weights, but merged tokens are cached
    elif not model.config.qformer.trainable:
        modules["qformer"] = model.qformer
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            # The tensor's own memory through the buffer protocol: `.tobytes()` copied every weight first,
            # which cost twice the hashing itself for a 4 GB ViT-g (same digest either way).
            digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    digest.update(repr(transform).encode())
    return digest.hexdigest()
