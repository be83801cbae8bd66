"""One function from a ModelConfig to a ready MiniGPT4, whatever the weights' source."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from minigpt4 import convert
from minigpt4.config import ConfigError, ModelConfig, TrainJobConfig
from minigpt4.device import check_device
from minigpt4.model.llm import load_llm
from minigpt4.model.minigpt4 import MiniGPT4
from minigpt4.model.tiny import is_random_llm
from minigpt4.precision import name_of, resolve_dtype

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig) -> MiniGPT4:
    """Build MiniGPT-4 as `cfg` describes and load the weights it names.

    Order: `weights.pretrained` (our folder) alone; otherwise the LLM from `llm.path`, the towers
    from `weights.vit` + `weights.blip2` (the released files), then `weights.projection`. Towers
    with no file stay random, which is only meant for tests and benchmarks, and is logged.
    """
    check_device(cfg.device)
    dtype, reason = resolve_dtype(cfg.dtype, cfg.device)
    cfg = replace(cfg, dtype=name_of(dtype))  # the model (and a folder it saves) records what was chosen
    if cfg.weights.pretrained:
        model = MiniGPT4.from_pretrained(cfg.weights.pretrained, device=cfg.device, dtype=dtype, llm_placement=cfg.llm)
        model.dtype_reason = reason
        return model
    qformer = cfg.connector == "qformer"
    if not qformer and cfg.weights.blip2:
        raise ConfigError("model.weights.blip2 is set, but model.connector=merge4 (the Llama-2 release) has no "
                          "Q-Former to load it into: leave weights.blip2 empty")
    if cfg.vision.arch == "eva_vit_g" and cfg.weights.vit and (cfg.weights.blip2 or not qformer):
        projection = cfg.weights.projection or None
        model = MiniGPT4.from_original(
            cfg.weights.vit, cfg.weights.blip2 or None, cfg.llm.path, projection, dtype=dtype, device=cfg.device,
            config=cfg,
        )
        model.dtype_reason = reason
        return model
    # A ViT file alone, for a Q-Former trained from scratch (the embedded-vit preset's distilled tower).
    vit_alone = cfg.vision.arch == "eva_vit_g" and bool(cfg.weights.vit) and qformer and cfg.qformer.trainable
    if (cfg.weights.vit or cfg.weights.blip2) and not (vit_alone and not cfg.weights.blip2):
        raise ConfigError(
            "model.weights.vit and model.weights.blip2 go together (eva_vit_g.pth and "
            "blip2_pretrained_flant5xxl.pth); set both, neither for random towers, or weights.vit alone with "
            "model.qformer.trainable=true (a Q-Former trained from scratch)"
        )
    llm, tokenizer = load_llm(cfg.llm, dtype, cfg.device)
    model = MiniGPT4(cfg, llm, tokenizer)
    if cfg.vision.arch == "efficientnet_lite0":
        from minigpt4.model.efficientnet import load_efficientnet_lite0_weights

        load_efficientnet_lite0_weights(model.vision)
    elif vit_alone:
        convert.load_eva_vit(model, cfg.weights.vit)
    else:
        log.warning("model.weights.vit/blip2 are not set: the vision tower and Q-Former are RANDOM")
    if cfg.weights.projection:
        convert.load_projection(model, cfg.weights.projection)
    model.lock()
    model.dtype_reason = reason
    return model.place(cfg.device, dtype)


def build_job_model(job: TrainJobConfig, device: str | None = None) -> MiniGPT4:
    """The model of a training job, built the one way `minigpt4 train` and `minigpt4 cache-features` both use.

    Parts with no weights file (random towers, a random projection) are drawn from `train.seed`, so every
    process of a run and the feature-cache builder get the same frozen weights: the cache's fingerprint
    depends on it. The callers' random state is left as it was. `device` overrides `model.device`
    (FSDP builds on the CPU and moves each process's shard itself).
    """
    cfg = job.model if device is None else replace(job.model, device=device)
    with torch.random.fork_rng(devices=[]):  # weights are drawn on the CPU generator, then placed
        torch.default_generator.manual_seed(job.train.seed)
        return build_model(cfg)


def random_parts(cfg: ModelConfig, llm_path: str) -> list[str]:
    """The parts of `build_model(cfg)` whose weights are random, by name; `llm_path` is the LLM it loaded.

    Towers without their files and a projection without a checkpoint start random (right for stage-1
    training, noise for chatting); so does the tiny preset's LLM. A `weights.pretrained` folder
    holds its own towers and projection.
    """
    parts = ["LLM"] if is_random_llm(llm_path) else []
    if cfg.weights.pretrained:
        return parts
    if cfg.vision.arch == "eva_vit_g" and cfg.connector == "merge4":
        parts += [] if cfg.weights.vit else ["vision tower"]
    elif cfg.vision.arch == "eva_vit_g" and not (cfg.weights.vit and cfg.weights.blip2):
        parts += ["Q-Former"] if cfg.weights.vit else ["vision tower", "Q-Former"]
    elif cfg.vision.arch == "efficientnet_lite0":
        parts.append("Q-Former")  # no pretrained Q-Former exists for this tower; training makes one
    if not cfg.weights.projection:
        parts.append("projection")
    return parts
