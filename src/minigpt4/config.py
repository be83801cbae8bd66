"""Typed configuration.

Every setting lives in a dataclass whose defaults are the released MiniGPT-4 (Vicuna v0 13B layout,
EVA-ViT-g/14, BLIP-2 Q-Former). A YAML file overrides only what differs, and `section.key=value`
strings from the command line override the YAML. Unknown keys, wrong types, non-finite numbers and
numbers outside a field's range (declared once, on the field, with `bounded`) are errors that name the
key, the value and the fix, so a typo never falls back silently to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type or range."""


@dataclass(frozen=True)
class Bounds:
    """The allowed interval of a numeric field (of each item, for a tuple of numbers)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is not allowed
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with `default` whose value (or each item of it) must lie in the given bounds."""
    bounds = Bounds(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                    low_open=gt is not None, high_open=lt is not None)
    return field(default=default, metadata={"bounds": bounds})


def _numbers(value: Any) -> list[float]:
    """The numbers a field holds: itself, or the items of a tuple/list of numbers."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_ranges(config: Any, prefix: str = "", recursive: bool = True) -> None:
    """Every number of dataclass `config` is finite and inside its field's `bounded` range.

    Raises:
        ConfigError: one line naming the key, the value, the allowed range and the default.
    """
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if recursive and dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        if recursive and isinstance(value, list):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{key}[{index}].")
        bounds: Bounds | None = f.metadata.get("bounds")
        default = f.default if f.default is not dataclasses.MISSING else None
        hint = f" (default {default!r})" if default is not None else ""
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{key}={value!r} is not a finite number: set a finite value"
                                  f"{' ' + str(bounds) if bounds else ''}{hint}")
            if bounds is not None and number not in bounds:
                raise ConfigError(f"{key}={value!r} is out of range: set {'each item' if value is not number else 'it'}"
                                  f" {bounds}{hint}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """The frozen image encoder. Defaults: EVA-ViT-g/14 as MiniGPT-4 builds it (39 of 40 blocks)."""

    arch: Literal["eva_vit_g", "efficientnet_lite0"] = "eva_vit_g"
    image_size: int = bounded(224, ge=1)
    patch_size: int = bounded(14, ge=1)
    width: int = bounded(1408, ge=1)
    depth: int = bounded(39, ge=1)
    num_heads: int = bounded(16, ge=1)
    mlp_dim: int = bounded(6144, ge=1)  # int(1408 * 4.3637)
    layer_norm_eps: float = bounded(1e-6, gt=0)
    # ln_vision sits between the tower and the Q-Former; it has PyTorch's default eps, not the ViT's.
    ln_vision_eps: float = bounded(1e-5, gt=0)


@dataclass
class QFormerConfig:
    """The BLIP-2 Q-Former query path (BERT-base with cross-attention every 2nd layer)."""

    num_query_tokens: int = bounded(32, ge=1)
    hidden_size: int = bounded(768, ge=1)
    num_layers: int = bounded(12, ge=1)
    num_heads: int = bounded(12, ge=1)
    intermediate_size: int = bounded(3072, ge=1)
    cross_attention_freq: int = bounded(2, ge=1)
    layer_norm_eps: float = bounded(1e-12, gt=0)
    dropout: float = bounded(0.1, ge=0, lt=1)
    # Frozen in MiniGPT-4. Only the embedded CPU preset trains it, because no pretrained
    # Q-Former exists for its vision tower.
    trainable: bool = False


@dataclass
class LLMConfig:
    """The frozen causal language model, loaded through transformers' AutoModelForCausalLM."""

    path: str = ""  # a Hugging Face model folder (Vicuna v0 7B/13B in the release)
    # The padding token, a token of the tokenizer's vocabulary. "" = the tokenizer's own, else its EOS
    # (the Vicuna v0 releases pad with EOS); the Llama-2 release pads with "$$", so an EOS is learned.
    pad_token: str = ""
    # How the LLM's weights are stored: "none" = model.dtype; "int8" = int8 weight-only (torchao, CPU or GPU,
    # activations stay in model.dtype); "bnb_8bit" / "bnb_4bit" = bitsandbytes on a CUDA GPU (the original's
    # low-resource mode). Like device_map, a loading choice of this machine: saved folders record none.
    quantization: Literal["none", "int8", "bnb_8bit", "bnb_4bit"] = "none"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Split the LLM over devices with accelerate: "" keeps it whole on model.device; "auto", "balanced",
    # "balanced_low_0" or "sequential" spread it over the GPUs, then the CPU, then disk (offload_folder).
    device_map: Literal["", "auto", "balanced", "balanced_low_0", "sequential"] = ""
    # The most each device may hold, "DEVICE=SIZE,..." with DEVICE a GPU index, cpu, mps or disk and SIZE
    # as accelerate reads it (e.g. "0=10GiB,cpu=30GiB"). "" = what the devices have. Needs device_map.
    max_memory: str = ""
    offload_folder: str = ""  # where weights that fit nowhere else go (disk offload)

    def __post_init__(self) -> None:
        if (self.max_memory or self.offload_folder) and not self.device_map:
            field_name = "max_memory" if self.max_memory else "offload_folder"
            raise ConfigError(f"model.llm.{field_name} is set but model.llm.device_map is not: "
                              "set model.llm.device_map=auto (or balanced, sequential)")
        if self.device_map and self.quantization != "none":
            # accelerate's offload hooks rebuild weights as plain Parameters, which fails for torchao's int8
            # tensors (tried: a TypeError at the first forward); bitsandbytes places the LLM itself.
            raise ConfigError(f"model.llm.device_map={self.device_map!r} with model.llm.quantization="
                              f"{self.quantization!r}: a quantized LLM loads whole on model.device; set one of them "
                              "to ''/none")
        self.max_memory_map()  # a malformed string fails here, when the config is read

    def max_memory_map(self) -> dict[int | str, int] | None:
        """`max_memory` as accelerate takes it ({0: bytes, "cpu": bytes}), or None when unset."""
        if not self.max_memory:
            return None
        from accelerate.utils import convert_file_size_to_int

        limits: dict[int | str, int] = {}
        for item in self.max_memory.split(","):
            device, sep, size = (part.strip() for part in item.partition("="))
            if not sep or not (device.isdigit() or device in ("cpu", "mps", "disk")):
                raise ConfigError(f"model.llm.max_memory={self.max_memory!r}: {item.strip()!r} is not DEVICE=SIZE "
                                  "with DEVICE a GPU index, cpu, mps or disk, e.g. \"0=10GiB,cpu=30GiB\"")
            try:
                limits[int(device) if device.isdigit() else device] = convert_file_size_to_int(size)
            except ValueError:
                raise ConfigError(f"model.llm.max_memory={self.max_memory!r}: {size!r} is not a size: "
                                  "write e.g. 200MiB, 10GiB or 1GB") from None
        return limits


@dataclass
class WeightsConfig:
    """Where the weights come from. Empty paths leave those parts randomly initialised (tests)."""

    vit: str = ""  # eva_vit_g.pth
    blip2: str = ""  # blip2_pretrained_flant5xxl.pth
    projection: str = ""  # pretrained_minigpt4.pth, prerained_minigpt4_7b.pth or a training checkpoint
    pretrained: str = ""  # a folder written by MiniGPT4.save_pretrained; replaces vit/blip2/projection


# Patch tokens the "merge4" connector concatenates into one LLM position.
MERGE_GROUP = 4


@dataclass
class ModelConfig:
    # How the vision tokens reach the projection: "qformer" (the Vicuna v0 releases: the BLIP-2
    # Q-Former's queries) or "merge4" (the Llama-2 release: no Q-Former; the ln_vision output without
    # its CLS token, every 4 consecutive patch tokens concatenated into one).
    connector: Literal["qformer", "merge4"] = "qformer"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    # Storage and compute dtype of the frozen parts. The trainable projection always stays fp32. `auto`: bf16 where
    # this device runs it natively (fp16 on GPUs without bf16), else fp32; see minigpt4.precision.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"  # any torch device string: "cpu", "cuda:1", "npu:0", "mps", ...
    # Attention kernel of the vision tower and Q-Former ("eager" is the plain reference math).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        if self.connector == "merge4":
            if self.vision.arch != "eva_vit_g":
                raise ConfigError(f"model.connector=merge4 needs vision.arch=eva_vit_g (a ViT with a CLS token), "
                                  f"got {self.vision.arch!r}; use model.connector=qformer")
            patches = (self.vision.image_size // self.vision.patch_size) ** 2
            if patches % MERGE_GROUP:
                raise ConfigError(f"model.connector=merge4 needs a patch count divisible by {MERGE_GROUP}, but "
                                  f"vision.image_size={self.vision.image_size} gives {patches}; use a multiple of "
                                  f"{2 * self.vision.patch_size} px")
            if self.qformer.trainable:
                raise ConfigError("model.qformer.trainable=true with model.connector=merge4: that connector has no "
                                  "Q-Former; set qformer.trainable=false or connector=qformer")

    @property
    def num_image_tokens(self) -> int:
        """LLM positions one image takes: the Q-Former's queries, or the ViT's patches merged 4 at a time."""
        if self.connector == "merge4":
            return (self.vision.image_size // self.vision.patch_size) ** 2 // MERGE_GROUP
        return self.qformer.num_query_tokens

    def connector_width(self, connector: str) -> int:
        """The projection's input width with `connector`: the Q-Former's width, or 4 ViT tokens side by side."""
        return self.vision.width * MERGE_GROUP if connector == "merge4" else self.qformer.hidden_size

    @property
    def image_feature_width(self) -> int:
        return self.connector_width(self.connector)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where no information is lost."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)} ({'; '.join(errors)})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any spelling float() understands.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    built = cls(**kwargs)
    check_ranges(built, prefix, recursive=False)  # nested sections were checked by their own from_dict
    return built


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (JSON/YAML-safe) of a config dataclass."""
    return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "model.llm.path=/x"] into a nested dict. Values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse the value ({err})") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is already set to a plain value")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"config file {path} is not a regular file")
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `section.key=value` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


PRESETS = ("minigpt4-13b", "minigpt4-7b", "minigpt4-llama2-7b", "tiny", "embedded", "embedded-vit")


def model_preset(name: str) -> ModelConfig:
    """Named model configurations: the two released MiniGPT-4 models, a tiny one for tests and the
    embedded CPU default (`minigpt4.embedded.prepare_smollm2` creates its LLM folder).

    The 7B and 13B presets differ only in the LLM they point at; the projection's output width is
    read from the loaded LLM, so it is not restated here. `minigpt4-llama2-7b` is the Llama-2 release:
    EVA-ViT-g tokens merged 4 at a time (no Q-Former), Llama-2-7b-chat padded with "$$".
    """
    if name in ("minigpt4-13b", "minigpt4-7b"):
        return ModelConfig()
    if name == "minigpt4-llama2-7b":
        return ModelConfig(connector="merge4", llm=LLMConfig(pad_token="$$"))
    if name == "tiny":
        return ModelConfig(
            vision=VisionConfig(width=32, depth=2, num_heads=4, mlp_dim=64),
            qformer=QFormerConfig(
                num_query_tokens=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
            ),
        )
    if name in ("embedded", "embedded-vit"):
        # A real but tiny stand-in that trains on a CPU in minutes: frozen EfficientNet-Lite0
        # (ImageNet) + a small trainable Q-Former + the projection + frozen SmolLM2-135M-Instruct.
        from minigpt4.embedded import default_distilled_vit_path, default_smollm2_dir

        vision, weights = VisionConfig(arch="efficientnet_lite0", image_size=224), WeightsConfig()
        if name == "embedded-vit":
            # The same with an EVA-style ViT tower (so it exports to transformers' BLIP-2 class): patch 32 at 224 px
            # gives a CLS token + EfficientNet's 7x7 tokens, distilled from EfficientNet-Lite0 (minigpt4.distil).
            # Its blocks use ln_vision's eps, so the export's post_layernorm (one eps for both) is exact.
            vision = VisionConfig(image_size=224, patch_size=32, width=256, depth=4, num_heads=4, mlp_dim=1024,
                                  layer_norm_eps=1e-5)
            weights = WeightsConfig(vit=str(default_distilled_vit_path()))
        return ModelConfig(
            vision=vision,
            weights=weights,
            qformer=QFormerConfig(
                num_query_tokens=8,
                hidden_size=256,
                num_layers=2,
                num_heads=4,
                intermediate_size=1024,
                cross_attention_freq=1,
                dropout=0.0,
                trainable=True,
            ),
            llm=LLMConfig(path=str(default_smollm2_dir())),
        )
    raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")


def model_config(preset: str = "minigpt4-13b", path: str | Path | None = None, overrides: list[str] | None = None) -> ModelConfig:
    """A model preset, then a YAML file of model keys, then `key=value` overrides."""
    data = to_dict(model_preset(preset))
    if path is not None:
        data = merge(data, read_yaml(path))
    return from_dict(ModelConfig, merge(data, parse_overrides(overrides or [])))


# --------------------------------------------------------------------------------------------
# Training job
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetSource:
    """One training dataset."""

    kind: Literal["webdataset", "aligned", "conversations"] = "webdataset"
    # webdataset: a brace-expanded shard pattern, e.g. /data/laion/{00000..10488}.tar;
    # aligned: a cc_sbu_align folder (filter_cap.json + image/{id}.jpg);
    # conversations: a JSON file of image conversations in LLaVA's instruction layout (every answer is learned,
    # each question wrapped in data.prompt_template; data.prompts is not used).
    path: str = ""
    ratio: float = bounded(1.0, gt=0)  # mixing weight among webdataset sources (the original mixes LAION:CC/SBU 115:14)


@dataclass
class DataConfig:
    """Where batches come from and how a sample is laid out. Defaults: the original stage 1."""

    datasets: list[DatasetSource] = field(default_factory=list)
    batch_size: int = bounded(64, ge=1)  # per process (the original: 64 x 4 GPUs in stage 1, 12 x 1 GPU in stage 2)
    num_workers: int = bounded(4, ge=0)
    shuffle_buffer: int = bounded(1000, ge=0)
    # "" = no instruction prompt (stage 1: [BOS][image][caption]); "default" = the package's own
    # stage-2 prompts; anything else is a prompt file, one prompt per line, each with <ImageHere>.
    prompts: str = ""
    prompt_template: str = "{}"  # applied to every prompt line; stage 2: "###Human: {} ###Assistant: "
    end_sym: str = "\n"  # appended to every target ("###" in stage 2)
    max_txt_len: int = bounded(32, ge=1)  # target + end_sym, in tokens (160 in stage 2)
    process_captions: bool = True  # blip_caption on webdataset captions (the aligned set uses raw captions)
    augment: bool = True  # RandomResizedCrop(scale 0.5-1) as the original; false = plain resize
    # An image file or tar member bigger than this is skipped and counted, never read (a sparse tar
    # member can declare gigabytes); chat, caption and the demo use the same default.
    max_image_bytes: int = bounded(64 * 1024 * 1024, ge=1)
    # A folder written by `minigpt4 cache-features` for these datasets: batches then carry the cached
    # frozen features instead of pixels (refused if made with other frozen weights or transform).
    feature_cache: str = ""


@dataclass
class TrainConfig:
    """Optimisation, precision, logging, checkpoints. Defaults: the original stage 1 run."""

    lr: float = bounded(1e-4, gt=0)  # peak lr ("init_lr")
    min_lr: float = bounded(8e-5, ge=0)  # end of the cosine
    warmup_lr: float = bounded(1e-6, ge=0)  # start of the linear warmup
    warmup_steps: int = bounded(5000, ge=0)
    # "legacy": the original's formula, including its lr step at the end of warmup (the default, so the
    # released recipes are reproduced); "continuous": warmup to lr, then cosine over the remaining steps.
    schedule: Literal["legacy", "continuous"] = "legacy"
    epochs: int = bounded(4, ge=1)
    iters_per_epoch: int = bounded(5000, ge=1)  # optimizer steps per "epoch" (the loaders are infinite)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    grad_accum: int = bounded(1, ge=1)  # micro-batches per optimizer step
    clip_grad_norm: float = bounded(0.0, ge=0)  # 0 = no clipping (the original has none)
    # A step whose loss is NaN or infinite is skipped (no update; fp16 also lowers the loss scale) and
    # counted; this many such steps in a row stop the run with a checkpoint.
    max_nonfinite_steps: int = bounded(20, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp16"  # autocast dtype; fp16 (CUDA only) adds a GradScaler
    # > 1: the rows of each micro-batch are grouped by length into this many groups, and the LLM runs on
    # each group cut to its own longest row, so padding is not computed (same loss). 1 = one padded batch.
    length_buckets: int = bounded(1, ge=1)
    seed: int = bounded(42, ge=0, lt=2**31)  # numpy takes seeds below 2**32; + rank must fit
    log_every: int = bounded(50, ge=1)  # steps
    save_every: int = bounded(0, ge=0)  # steps; 0 = at the end of every epoch (the original's cadence)
    keep_last: int = bounded(3, ge=1)  # checkpoints kept in output_dir
    output_dir: str = "output/run"
    resume: str = ""  # "" = fresh start, a checkpoint path, or "auto" = the newest checkpoint in output_dir
    # torch.distributed backend under torchrun: "auto" = nccl on CUDA, gloo otherwise.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # ddp: every process holds the whole model (frozen parts unsynchronised). fsdp: the frozen LLM's
    # layers are sharded across processes (FSDP2), for LLMs that do not fit one GPU.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = True


@dataclass
class TrainJobConfig:
    """A training run: the model, its data and the optimisation.

    `preset` names the model preset (see `model_preset`) that the `model` section refines.
    """

    preset: str = "minigpt4-13b"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # FSDP shards plain weights; a quantized LLM holds int8 tensor subclasses it cannot split (and is small
        # enough for DDP, where the frozen LLM trains the projection as it does in full precision).
        if self.train.strategy == "fsdp" and self.model.llm.quantization != "none":
            raise ConfigError(f"train.strategy=fsdp with model.llm.quantization={self.model.llm.quantization!r}: "
                              "FSDP cannot shard a quantized LLM; use train.strategy=ddp or quantization=none")


def train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainJobConfig:
    """A training job from a YAML file and `section.key=value` overrides.

    The `model` section is applied on top of the preset named by `preset` (YAML or override).
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    preset = data.get("preset", TrainJobConfig.preset)
    if not isinstance(preset, str):
        raise ConfigError(f"preset: expected a preset name, got {preset!r}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    data["model"] = merge(to_dict(model_preset(preset)), model)
    return from_dict(TrainJobConfig, data)
