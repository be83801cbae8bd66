"""MiniGPT-4: a frozen vision tower + Q-Former, one trainable projection, a frozen causal LLM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigpt4.config import MERGE_GROUP, ConfigError, LLMConfig, ModelConfig, from_dict, to_dict
from minigpt4.chat.defaults import ChatDefaults
from minigpt4.convert import CheckpointError, read_checkpoint, read_json_object, upgrade_tower_keys
from minigpt4.model.llm import check_not_quantized, is_dispatched, is_quantized, load_llm
from minigpt4.model.qformer import QFormer
from minigpt4.model.vision import build_vision_tower, tower_configs
from minigpt4.precision import name_of, resolve_dtype
from minigpt4.processing.prompt import IGNORE_INDEX, LayoutBatch, layout_batch

log = logging.getLogger(__name__)

# LLMs whose logits are exactly lm_head(last hidden state): for these the loss applies the head
# only at target positions, which saves most of the vocabulary matmul.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"})

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# 2: the towers under transformers' Blip2VisionModel / Blip2QFormerModel names. Folders of version 1 (our former
# names) still load: `convert.upgrade_tower_keys` renames their tensors.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_KEYS = {"format_version", "model", "chat"}


def read_folder(directory: Path) -> tuple[ModelConfig, ChatDefaults]:
    """The model config and chat defaults a save_pretrained folder records; anything malformed is a CheckpointError."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a folder written by save_pretrained")
    meta = read_json_object(path)
    unknown = sorted(set(meta) - CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(CONFIG_KEYS))}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not one of "
            f"{', '.join(map(str, READABLE_VERSIONS))}: not a folder written by this version of save_pretrained"
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' must be an object (the model config), got {meta.get('model')!r}")
    try:
        config = from_dict(ModelConfig, meta["model"], prefix="model.")
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    return config, ChatDefaults.load(directory, meta.get("chat"), path)


def merge_patch_tokens(tokens: torch.Tensor, group: int = MERGE_GROUP) -> torch.Tensor:
    """(B, 1 + N, C) ViT tokens -> (B, N / group, group * C): the CLS token dropped, then every `group`
    consecutive patch tokens concatenated side by side (a plain reshape), as the Llama-2 release does."""
    patches = tokens[:, 1:]
    batch, count, width = patches.shape
    return patches.reshape(batch, count // group, group * width)


def find_meta_tensors(module: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (i.e. never loaded)."""
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


class MiniGPT4(nn.Module):
    """The MiniGPT-4 model.

    The constructor only builds modules from `config` around an already loaded `llm`; it reads no
    file. Use `from_original` (released checkpoints) or `from_pretrained` (our format) to get weights.

    Args:
        config: the model configuration.
        llm: the causal language model; its hidden size sets the projection's output width.
        tokenizer: the LLM's tokenizer.
        towers_on_meta: create the vision tower, ln_vision and Q-Former without storage, for a
            loader that assigns every tensor right after (saves a full copy of a 1B-parameter ViT).
    """

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        towers_on_meta: bool = False,
    ):
        super().__init__()
        self.config = config
        with torch.device("meta") if towers_on_meta else torch.device("cpu"):
            self.vision = build_vision_tower(config)
            self.ln_vision = nn.LayerNorm(self.vision.num_features, eps=config.vision.ln_vision_eps)
            # The "merge4" connector (the Llama-2 release) has no Q-Former at all.
            self.qformer = (QFormer(tower_configs(config, self.vision.num_features)[1],
                                    config.qformer.num_query_tokens)
                            if config.connector == "qformer" else None)
        if self.qformer is None and towers_on_meta:
            # Only BLIP-2's file holds trained ln_vision weights, and the Llama-2 release loads none: its
            # ln_vision keeps PyTorch's initial weight 1 and bias 0.
            self.ln_vision = nn.LayerNorm(self.vision.num_features, eps=config.vision.ln_vision_eps)
        self.proj = nn.Linear(config.image_feature_width, llm.config.hidden_size)  # "llama_proj"
        self.llm = llm
        self.tokenizer = tokenizer
        # How to talk to the model: `save_pretrained` records it, `from_pretrained` and training checkpoints set it.
        self.chat_defaults = ChatDefaults.for_release(config.connector)
        self.dtype_reason = "set by model.dtype"  # why config.dtype is what it is; build_model says when auto chose
        self.lock()

    # ---------------------------------------------------------------- freezing and placement

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.vision, self.ln_vision, self.llm]
        if self.qformer is not None and not self.config.qformer.trainable:
            frozen.append(self.qformer)
        return frozen

    def lock(self) -> None:
        """Freeze everything but the projection (and the Q-Former where the config trains it)."""
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "MiniGPT4":
        """Switch the trainable parts to `mode`; the frozen towers always stay in eval mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def place(self, device: str | torch.device, dtype: torch.dtype) -> "MiniGPT4":
        """Move to `device`; frozen towers run in `dtype`; trainable weights stay fp32."""
        device = torch.device(device)
        self.vision.to(device, dtype)
        self.ln_vision.to(device, dtype)
        if self.qformer is not None:
            self.qformer.to(device, torch.float32 if self.config.qformer.trainable else dtype)
        self.proj.to(device, torch.float32)
        if not is_quantized(self.llm) and not is_dispatched(self.llm):
            self.llm.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # ---------------------------------------------------------------- forward pieces

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, num_image_tokens, H_llm) projected image embeddings."""
        return self.project(self.frozen_features(pixel_values))

    def frozen_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Everything frozen before the first trainable module, computed without gradients.

        With the released layout (frozen Q-Former) this is the Q-Former output (B, Q, 768); when the
        config trains the Q-Former it is the normalised tower output (B, N_img, C); with the merge4
        connector, those tokens merged (B, 64, 5632). It depends only on frozen weights, so it can be
        cached per image.
        """
        with torch.no_grad():
            features = self.ln_vision(self.vision(pixel_values.to(self.device, self.ln_vision.weight.dtype)))
            if self.qformer is None:
                features = merge_patch_tokens(features)
            elif not self.config.qformer.trainable:
                features = self.qformer(features)  # (B, Q, C_qformer)
        return features

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`frozen_features` output -> (B, Q, H_llm): the trainable part of image encoding."""
        if self.qformer is not None and self.config.qformer.trainable:
            features = self.qformer(features.to(self.qformer.query_tokens.dtype))
        return self.proj(features.to(self.proj.weight.dtype))

    def embed(self, batch: LayoutBatch, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `batch` with the image embeddings written at its image positions.

        `image_embeds` is (num_images, Q, H) in the order the images appear, row by row.
        """
        embeds = self.llm.get_input_embeddings()(batch.input_ids)  # (B, L, H)
        slots = int(batch.image_mask.sum())
        if slots != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"the prompt has {slots} image positions but {image_embeds.shape[0]} images of "
                f"{image_embeds.shape[1]} tokens were given"
            )
        mask = batch.image_mask.unsqueeze(-1).expand_as(embeds)
        # A dispatched LLM's embeddings may sit on another device than the towers.
        return embeds.masked_scatter(mask, image_embeds.to(embeds.device, embeds.dtype))

    def lm_loss(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        length_buckets: int = 1,
        full_logits: bool = False,
    ) -> torch.Tensor:
        """Causal-LM cross-entropy, a mean over every target token of the batch (as HF computes it).

        Args:
            length_buckets: > 1 sorts the rows by length and runs the LLM on that many groups, each
                cut to its own longest row, so trailing padding is not computed. Same loss (padding
                after a row's last token never reaches its earlier positions), fewer FLOPs.
            full_logits: apply the LM head at every position, as a plain `llm(...).logits` does (the
                benchmark baseline), instead of only at target positions.
        """
        if length_buckets < 1:
            raise ValueError(f"length_buckets={length_buckets} must be at least 1 (1 = no bucketing)")
        if length_buckets == 1:
            logits, targets = self._target_logits(inputs_embeds, attention_mask, labels, full_logits)
            return F.cross_entropy(logits.float(), targets)
        positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
        ends = ((attention_mask != 0) * positions).amax(dim=1)  # (B,) one past each row's last real token
        order = torch.argsort(ends)
        total = inputs_embeds.new_zeros((), dtype=torch.float32)
        for rows in torch.tensor_split(order, min(length_buckets, len(order))):
            end = int(ends[rows].max())
            logits, targets = self._target_logits(
                inputs_embeds[rows, :end], attention_mask[rows, :end], labels[rows, :end], full_logits
            )
            total = total + F.cross_entropy(logits.float(), targets, reduction="sum")
        return total / (labels[:, 1:] != IGNORE_INDEX).sum()

    def _target_logits(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, full_logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, V) logits at the T target positions of the batch, and the (T,) tokens they predict."""
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE_INDEX
        if self.llm.config.model_type in _PLAIN_HEAD_MODEL_TYPES and not full_logits:
            hidden = self.llm.base_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (T, V) at target positions only
        else:
            logits = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, :-1][keep]
        return logits, targets[keep]

    def loss_from_image_embeds(
        self,
        image_embeds: torch.Tensor,
        texts: list[str],
        prompt: str | None = None,
        end_sym: str = "\n",
        max_txt_len: int = 32,
    ) -> torch.Tensor:
        """The training loss given projected image embeddings (B, Q, H); see `loss`."""
        batch = layout_batch(self.tokenizer, texts, self.num_image_tokens, prompt, end_sym, max_txt_len)
        batch = batch.to(self.device)
        return self.lm_loss(self.embed(batch, image_embeds), batch.attention_mask, batch.labels)

    def loss(
        self,
        pixel_values: torch.Tensor,
        texts: list[str],
        prompt: str | None = None,
        end_sym: str = "\n",
        max_txt_len: int = 32,
    ) -> torch.Tensor:
        """Mean token cross-entropy of `texts` given the images, exactly as MiniGPT-4 computes it.

        Args:
            pixel_values: (B, 3, H, W) normalised images.
            texts: B target texts (captions or descriptions).
            prompt: the formatted prompt containing `<ImageHere>`; None for stage 1 (no prompt).
            end_sym: appended to every target ("\\n" stage 1, "###" stage 2).
            max_txt_len: truncation of target + end_sym, in tokens (32 stage 1, 160 stage 2).
        """
        return self.loss_from_image_embeds(self.encode_images(pixel_values), texts, prompt, end_sym, max_txt_len)

    # ---------------------------------------------------------------- weights

    def tower_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything except the LLM: vision.*, ln_vision.*, qformer.*, proj.*."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def load_tower_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Strictly load `tower_state_dict()` keys; every missing or unexpected key is named."""
        from minigpt4.convert import assign_strict

        assign_strict(self, state, source=source, expected=self.tower_state_dict().keys())

    @classmethod
    def from_original(
        cls,
        vit: str | Path,
        blip2: str | Path | None,
        llm: str | Path,
        projection: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        config: ModelConfig | None = None,
    ) -> "MiniGPT4":
        """Build MiniGPT-4 from the released files, each loaded strictly.

        Args:
            vit: `eva_vit_g.pth`.
            blip2: `blip2_pretrained_flant5xxl.pth`; None for the merge4 connector (no Q-Former).
            llm: the Vicuna (or other causal LM) folder in Hugging Face format.
            projection: `pretrained_minigpt4.pth` / `prerained_minigpt4_7b.pth` / a training
                checkpoint; None leaves the projection randomly initialised (stage-1 start).
        """
        from minigpt4 import convert

        config = from_dict(ModelConfig, to_dict(config or ModelConfig()))
        config.llm.path = str(llm)
        config.dtype = name_of(dtype)
        config.device = str(device)
        llm_model, tokenizer = load_llm(config.llm, dtype, device)
        model = cls(config, llm_model, tokenizer, towers_on_meta=True)
        convert.load_eva_vit(model, vit)
        if (blip2 is None) != (config.connector == "merge4"):
            raise ConfigError(f"model.connector={config.connector} {'needs' if blip2 is None else 'takes no'} "
                              "BLIP-2 file (model.weights.blip2): the Q-Former's weights come from it")
        if blip2 is not None:
            convert.load_blip2(model, blip2)
        missing = find_meta_tensors(model)
        if missing:
            raise convert.CheckpointError(f"no checkpoint provided these tensors: {', '.join(missing)}")
        if projection is not None:
            convert.load_projection(model, projection)
        model.lock()
        return model.place(device, dtype)

    def save_pretrained(self, directory: str | Path, include_llm: bool = False) -> None:
        """Write `config.json`, `model.safetensors` (vision, ln_vision, Q-Former, projection) and
        `generation_config.json`; config.json also records the conversation template and system text
        (`chat_defaults`), so the folder carries how to talk to the model.

        The LLM is referenced by `model.llm.path` (it is frozen and usually large). With
        `include_llm=True`, or when the config has no LLM path, it is saved to `directory/llm`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = from_dict(ModelConfig, to_dict(self.config))
        if include_llm or not config.llm.path:
            check_not_quantized(self.llm, f"saving the LLM to {directory / 'llm'}")
            self.llm.save_pretrained(directory / "llm")
            self.tokenizer.save_pretrained(directory / "llm")
            config.llm.path = "llm"
        else:
            config.llm.path = str(Path(config.llm.path).expanduser().resolve())
        # How this machine split or quantized the LLM is not part of the model (from_pretrained takes it as an
        # argument): the folder names the full-precision LLM.
        config.llm.device_map, config.llm.max_memory, config.llm.offload_folder = "", "", ""
        config.llm.quantization = "none"
        state = {k: v.detach().contiguous() for k, v in self.tower_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.chat_defaults.save_generation_config(directory)
        meta = {"format_version": FORMAT_VERSION, "model": to_dict(config), "chat": self.chat_defaults.config_entry()}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        llm_placement: LLMConfig | None = None,
    ) -> "MiniGPT4":
        """Load a folder written by `save_pretrained` (a relative LLM path is relative to the folder), or by
        `minigpt4 export --format transformers`. `llm_placement`'s device_map, max_memory and offload_folder
        split the LLM over devices, its quantization stores the LLM's weights in fewer bits (the folder records
        neither)."""
        from minigpt4.export import import_transformers, is_transformers_export

        directory = Path(directory)
        if is_transformers_export(directory):
            if llm_placement is not None and llm_placement.device_map:
                raise ConfigError(f"model.llm.device_map={llm_placement.device_map!r}: {directory} is a transformers "
                                  "export, which loads whole; use the save_pretrained folder, or device_map=''")
            if llm_placement is not None and llm_placement.quantization != "none":
                raise ConfigError(f"model.llm.quantization={llm_placement.quantization!r}: {directory} is a "
                                  "transformers export, which loads in full precision; use the save_pretrained "
                                  "folder, or quantization=none")
            return import_transformers(directory, device, dtype)
        config, chat_defaults = read_folder(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the folder is incomplete")
        llm_path = Path(config.llm.path)
        if not llm_path.is_absolute():
            config.llm.path = str(directory / llm_path)
        if device is not None:
            config.device = str(device)
        if llm_placement is not None:
            config.llm.device_map = llm_placement.device_map
            config.llm.max_memory = llm_placement.max_memory
            config.llm.offload_folder = llm_placement.offload_folder
            config.llm.quantization = llm_placement.quantization
        # The folder records the dtype it was resolved to; one that says "auto" is resolved for this device.
        torch_dtype = dtype if dtype is not None else resolve_dtype(config.dtype, config.device)[0]
        config.dtype = name_of(torch_dtype)
        llm_model, tokenizer = load_llm(config.llm, torch_dtype, config.device)
        model = cls(config, llm_model, tokenizer, towers_on_meta=True)
        num_patches = (config.vision.image_size // config.vision.patch_size) ** 2
        state = upgrade_tower_keys(read_checkpoint(weights), num_patches, str(weights))  # version 1's names
        model.load_tower_state_dict(state, source=str(weights))
        model.chat_defaults = chat_defaults
        model.lock()
        return model.place(config.device, torch_dtype)
