"""Loading the frozen language model and its tokenizer from a local Hugging Face folder.

Any causal LM that `AutoModelForCausalLM` reads works; Vicuna v0 (LLaMA format) is the default.
Nothing is fetched from a hub: a missing folder is an error that names `model.llm.path`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minigpt4.config import ConfigError, LLMConfig
from minigpt4.convert import CheckpointError, check_finite, name_list

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def restore_sentencepiece_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a LLaMA SentencePiece tokenizer split text exactly like `sentencepiece` itself.

    transformers 5 loads LLaMA tokenizers with a Metaspace pre-tokenizer that drops the dummy "▁"
    SentencePiece adds in front of text that already starts with a space, so ids differ from the
    ones Vicuna and MiniGPT-4 were trained with. Prepending "▁" and replacing spaces in the
    normaliser instead restores SentencePiece's behaviour (tested against `sentencepiece`).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.pre_tokenizer).__name__ != "Metaspace":
        return
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def load_tokenizer(path: str | Path, pad_token: str = "") -> PreTrainedTokenizerBase:
    """The LLM's tokenizer with right padding (training) and its pad token: `pad_token` when given
    (`model.llm.pad_token`; it must be a token of the vocabulary, so no embedding row is added), else the
    tokenizer's own, else EOS."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if type(tokenizer).__name__.startswith("LlamaTokenizer"):
        restore_sentencepiece_prefix(tokenizer)
    if pad_token:
        token_id = tokenizer.convert_tokens_to_ids(pad_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
            raise ConfigError(f"model.llm.pad_token={pad_token!r} is not a token of the tokenizer in {path}: give "
                              "one of its vocabulary (the Llama-2 release pads with '$$') or '' for its own or EOS")
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# Keys transformers may report that are legitimately absent or surplus, and why.
ALLOWED_UNEXPECTED = [
    (r"\.rotary_emb\.inv_freq$", "a constant rotary buffer that older LLaMA/Vicuna files store"),
]
ALLOWED_MISSING_WHEN_TIED = "lm_head.weight"  # shares the input embeddings when the config ties them


def check_loading_report(llm: PreTrainedModel, report: dict, source: str) -> None:
    """Every load is strict: raise CheckpointError naming the keys transformers found missing,
    unexpected or mis-shaped (it only logs them, and initialises missing weights randomly)."""
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    missing = {k for k in report.get("missing_keys", ()) if not (tied and k == ALLOWED_MISSING_WHEN_TIED)}
    unexpected = set()
    for key in report.get("unexpected_keys", ()):
        reason = next((why for pattern, why in ALLOWED_UNEXPECTED if re.search(pattern, key)), None)
        if reason is None:
            unexpected.add(key)
        else:
            log.info("%s: ignoring %s, %s", source, key, reason)
    mismatched = {
        key if isinstance(key, str) else f"{key[0]} (file {tuple(key[1])}, model {tuple(key[2])})"
        for key in report.get("mismatched_keys", ())
    }
    problems = [f"{label}: {name_list(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    problems += [str(msg) for msg in report.get("error_msgs", ())]
    if problems:
        raise CheckpointError(f"the LLM in {source} does not fit its config: " + "; ".join(problems))


def is_quantized(llm: PreTrainedModel) -> bool:
    """Whether transformers loaded `llm` through a quantizer: it is then placed at load and cannot be moved or
    cast, and its weights are no longer plain tensors of the original values."""
    return getattr(llm, "hf_quantizer", None) is not None


def is_dispatched(llm: PreTrainedModel) -> bool:
    """Whether accelerate placed `llm` by a device map (split over devices, or offloaded): then it must not be
    moved as a whole, and its hooks move each layer's inputs to that layer's device."""
    return bool(getattr(llm, "hf_device_map", None)) and not is_quantized(llm)


def unwrapped_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each quantized weight (a tensor subclass such as torchao's Int8Tensor, whose ops stop at the
    matmul) replaced by the plain tensors it holds, `name.qdata`, `name.scale`, ..., so `check_finite` can read
    them: a NaN or inf in a weight row before quantization leaves a NaN or inf scale."""
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if hasattr(tensor, "__tensor_flatten__"):
            inner_names, _ = tensor.__tensor_flatten__()
            plain.update({f"{name}.{inner}": getattr(tensor, inner) for inner in inner_names})
        else:
            plain[name] = tensor
    return plain


def stored_bytes(module: torch.nn.Module) -> int:
    """The bytes `module`'s parameters and buffers take in memory: a shared tensor once, a quantized weight by
    the data and scales it stores, an offloaded (meta) tensor not at all."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return sum(t.numel() * t.element_size() for t in unwrapped_tensors(tensors).values() if not t.is_meta)


def check_offloaded_finite(llm: PreTrainedModel, source: str) -> None:
    """`check_finite` for the weights accelerate offloaded (on the meta device in the model): each is read
    from its offload store through the module's hook, checked and dropped, so RAM holds one at a time."""
    for module_name, module in llm.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        for name, tensor in module.named_parameters(recurse=False):
            if tensor.is_meta:
                check_finite(weights[name], source, f"{module_name}.{name}")
        for name, tensor in module.named_buffers(recurse=False):
            if tensor.is_meta and name in weights:
                check_finite(weights[name], source, f"{module_name}.{name}")


def quantization_config(cfg: LLMConfig, device: torch.device):
    """transformers' `quantization_config` for `model.llm.quantization` on `device`, or None for "none".

    A choice this machine cannot run is refused here, in one line, before any weight is read.
    """
    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        # Weight-only: each Linear keeps int8 weights and one scale per output row; activations stay in
        # model.dtype, so the answers move little (measured in benchmarks/quantization.py).
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            f"model.llm.quantization={cfg.quantization!r} needs bitsandbytes on a CUDA GPU, but the device is "
            f"{device}: use model.llm.quantization=int8 (torchao int8 weights, any device) or none"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ConfigError(
            f"model.llm.quantization={cfg.quantization!r} needs the bitsandbytes package: pip install bitsandbytes"
        ) from err
    if cfg.quantization == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)


def check_not_quantized(llm: PreTrainedModel, action: str) -> None:
    """Raise ConfigError (one line) when `action` (saving, exporting) would need the full-precision weights of
    an LLM that was loaded quantized."""
    if is_quantized(llm):
        raise ConfigError(f"{action} needs the LLM's full weights, but it was loaded quantized "
                          "(model.llm.quantization): load it with model.llm.quantization=none")


def load_llm(
    cfg: LLMConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen LLM and its tokenizer from `cfg.path`; all parameters get requires_grad=False."""
    path = Path(cfg.path).expanduser()
    if not cfg.path or not path.is_dir():
        raise FileNotFoundError(
            f"model.llm.path={cfg.path!r} is not a folder. Point it at a Hugging Face model folder "
            "(config.json, weights, tokenizer), e.g. model.llm.path=/models/vicuna-7b-v0"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.llm.path={cfg.path!r} has no config.json: not a Hugging Face model folder")
    device = torch.device(device)
    quantization = quantization_config(cfg, device)
    kwargs: dict = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if quantization is not None:  # quantizers place the weights as they load them
        kwargs.update(quantization_config=quantization, device_map=device)
    if cfg.device_map:
        kwargs.update(device_map=cfg.device_map, max_memory=cfg.max_memory_map(),
                      offload_folder=str(Path(cfg.offload_folder).expanduser()) if cfg.offload_folder else None)
    try:
        # Mismatched shapes are reported (and then refused below) rather than raised without their names.
        llm, report = AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as err:  # transformers' errors for unreadable or mis-shaped files
        raise CheckpointError(f"model.llm.path={cfg.path!r}: the LLM could not be loaded: {err}") from err
    check_loading_report(llm, report, str(path))
    check_finite(unwrapped_tensors(llm.state_dict()), f"the LLM in {path}")  # skips offloaded (meta) weights...
    check_offloaded_finite(llm, f"the LLM in {path}")  # ...which are read back one tensor at a time here
    if quantization is None and not is_dispatched(llm):
        llm.to(device)
    llm.requires_grad_(False)
    llm.eval()
    # Training never reuses a KV cache; generation asks for one explicitly.
    llm.config.use_cache = False
    return llm, load_tokenizer(path, cfg.pad_token)
