"""MiniGPT-4 as a plain transformers `Blip2ForConditionalGeneration` folder, and the input recipe it needs.

MiniGPT-4 is BLIP-2's vision side in front of a causal LM, so transformers' BLIP-2 class holds it
with no custom code. Our towers are its own modules already: our EVA-ViT-g (a `Blip2VisionModel`) is
`vision_model`, ln_vision its `post_layernorm`, our Q-Former (a `Blip2QFormerModel`) `qformer` with its
queries as `query_tokens`, our projection `language_projection`, the LLM `language_model`.
transformers splices the projected image features wherever the image token sits in `input_ids`;
MiniGPT-4 puts the image in the middle of its prompt, so the export adds that token to the
tokenizer and embedding matrix, and `build_inputs` lays a prompt out with the image tokens exactly
where `layout_sample` (our one layout function) puts the image.

What cannot be carried over exactly, and how it is handled:
- ln_vision has eps 1e-5, the ViT blocks 1e-6, but transformers gives `post_layernorm` the blocks'
  eps (one `layer_norm_eps`). No weight rescaling can express a per-token eps change, so the
  blocks keep theirs (39 layers of exact pre-norms matter more) and ln_vision runs at 1e-6; the
  export measures what that changes in the image embeddings and reports it.
- `from_pretrained` reads such a folder back (`import_transformers`): a `minigpt4` entry in its config
  records our model config and chat defaults; the image token leaves the tokenizer and the LLM again.
- The EfficientNet tower (embedded preset) and the merge4 connector (Llama-2 release) have no
  BLIP-2 counterpart (the class builds a `Blip2VisionModel` and a Q-Former, always): export refuses.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from minigpt4.config import ConfigError, ModelConfig, from_dict, to_dict
from minigpt4.convert import CheckpointError, read_json_object
from minigpt4.model.vision import tower_configs
from minigpt4.processing.image import CLIP_MEAN, CLIP_STD
from minigpt4.processing.prompt import layout_sample

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # what transformers' Blip2Processor adds; one per Q-Former query
QUESTION = "{question}"  # where the user's question goes in the prompt the model card shows
EXPORT_VERSION = 1  # of the `minigpt4` entry in the exported config.json
ENTRY_KEYS = {"format_version", "model", "chat", "llm_vocab_size"}


@dataclass
class ExportReport:
    """What `export_transformers` wrote and measured."""

    directory: Path
    image_token_id: int
    prompt: str  # the one-question prompt, with `QUESTION` and "<ImageHere>"
    image_embeds_max_diff: float  # transformers' image embeddings vs ours on a probe image


def build_inputs(
    tokenizer: PreTrainedTokenizerBase, prompt: str, num_image_tokens: int, image_token_id: int, add_bos: bool = True
) -> list[int]:
    """`input_ids` for transformers' BLIP-2 class: `prompt` (one "<ImageHere>" per image) laid out as
    `layout_sample` does, with `num_image_tokens` copies of `image_token_id` at each image."""
    laid = layout_sample(tokenizer, prompt, num_image_tokens, add_bos=add_bos)
    return [image_token_id if is_image else token for token, is_image in zip(laid.input_ids, laid.image_mask)]


def check_exportable(config: ModelConfig) -> None:
    """Raise ConfigError (one line) when a model of this config has no BLIP-2 form."""
    if config.vision.arch != "eva_vit_g":
        raise ConfigError(
            f"model.vision.arch={config.vision.arch} cannot be exported to transformers: "
            "Blip2ForConditionalGeneration always builds an EVA-style Blip2VisionModel, which cannot hold the "
            "EfficientNet tower; eva_vit_g models export (minigpt4-7b/13b, tiny, and the quickstart's ViT form: "
            "`minigpt4 quickstart --tower vit`)"
        )
    if config.connector != "qformer":
        raise ConfigError(
            f"model.connector={config.connector} cannot be exported to transformers: "
            "Blip2ForConditionalGeneration always puts a Q-Former between the vision tower and the LLM"
        )


def blip2_configs(model, image_token_id: int, vocab_size: int):
    """The `Blip2Config` holding our towers' configs and the LLM's own config as `text_config`, plus a
    `minigpt4` entry (our model config, chat defaults, the LLM's own vocabulary size) for the way back."""
    from transformers import Blip2Config

    vision_config, qformer_config = tower_configs(model.config)
    text_config = copy.deepcopy(model.llm.config)
    text_config.vocab_size = vocab_size
    text_config.use_cache = True
    return Blip2Config(
        # `layer_norm_eps` is the blocks' and, in transformers, also post_layernorm's (ln_vision's 1e-5): module doc
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=model.config.qformer.num_query_tokens,
        image_token_index=image_token_id,
        minigpt4={"format_version": EXPORT_VERSION, "model": to_dict(model.config),
                  "chat": model.chat_defaults.record(),
                  "llm_vocab_size": model.llm.get_input_embeddings().num_embeddings},
    )


# Our tower keys (`MiniGPT4.tower_state_dict`) -> `Blip2ForConditionalGeneration`'s, by prefix. Our towers are its
# own modules, so only where they sit differs: ln_vision is its post_layernorm, and the queries sit outside its
# Q-Former (the first matching prefix wins).
TOWER_PREFIXES = [("ln_vision.", "vision_model.post_layernorm."), ("vision.", "vision_model."),
                  ("qformer.query_tokens", "query_tokens"), ("qformer.", "qformer."),
                  ("proj.", "language_projection.")]


def _swap_prefix(key: str, pairs: list[tuple[str, str]]) -> str:
    """`key` with the first matching prefix of `pairs` replaced; unchanged (to be reported) when none matches."""
    for prefix, replacement in pairs:
        if key.startswith(prefix):
            return replacement + key.removeprefix(prefix)
    return key


def towers_to_blip2(model) -> dict[str, torch.Tensor]:
    """Our vision tower, ln_vision, Q-Former and projection under `Blip2ForConditionalGeneration`'s names."""
    return {_swap_prefix(key, TOWER_PREFIXES): tensor for key, tensor in model.tower_state_dict().items()}


def towers_from_blip2(blip2_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `towers_to_blip2`, for `model.load_tower_state_dict` (which names what is missing)."""
    inverse = [(new, old) for old, new in TOWER_PREFIXES]
    return {_swap_prefix(key, inverse): tensor for key, tensor in blip2_state.items()
            if not key.startswith("language_model.")}


def _probe_image_embeds_diff(model, vision_model, qformer_model, query_tokens: torch.Tensor,
                             projection: torch.nn.Linear) -> float:
    """Max |transformers' - ours| over the projected image embeddings of one fixed random image."""
    size = model.config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encode_images(pixels).float().cpu()
        image = vision_model(pixel_values=pixels.to(vision_model.dtype)).last_hidden_state
        queries = qformer_model(query_embeds=query_tokens, encoder_hidden_states=image).last_hidden_state
        theirs = projection(queries).float()
    return float((ours - theirs).abs().max())


def export_transformers(model, directory: str | Path, overwrite: bool = False) -> ExportReport:
    """Write `model` as a folder that `transformers.Blip2ForConditionalGeneration.from_pretrained` loads
    strictly: weights, config, generation_config.json (the model's decoding and template stops), the
    processor (image processor + tokenizer with the image token) and a model card showing the inputs."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        GenerationConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from minigpt4.chat.templates import Message, get_template
    from minigpt4.model.llm import check_not_quantized

    check_exportable(model.config)
    check_not_quantized(model.llm, "exporting to transformers")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty: give a new folder (or --overwrite)")

    tokenizer = copy.deepcopy(model.tokenizer)
    image_processor = BlipImageProcessorPil(
        size={"height": model.config.vision.image_size, "width": model.config.vision.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    num_queries = model.config.qformer.num_query_tokens
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_queries)  # adds IMAGE_TOKEN
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_size = max(len(tokenizer), model.llm.get_input_embeddings().num_embeddings)

    config = blip2_configs(model, image_token_id, vocab_size)
    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(config)
    llm_state = {k: v.detach().float().cpu() for k, v in model.llm.state_dict().items()}
    old_rows = model.llm.get_input_embeddings().num_embeddings
    grown: dict[str, torch.Tensor] = {}
    for name, tensor in llm_state.items():
        is_vocab_matrix = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        if is_vocab_matrix and tensor.dim() == 2 and tensor.shape[0] == old_rows:
            # The image token's rows: its input embedding is always overwritten by the image features, and
            # generation_config suppresses it as an output, so zeros are exact.
            grown[name] = torch.cat([tensor, tensor.new_zeros(vocab_size - old_rows, tensor.shape[1])])
    llm_state.update(grown)
    state = {f"language_model.{k}": v for k, v in llm_state.items()} | towers_to_blip2(model)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    blip2.load_state_dict(state, strict=True, assign=True)
    blip2.tie_weights()  # assigning gave a tied LLM's head and embeddings two (equal) tensors; share one again
    blip2.eval()

    diff = _probe_image_embeds_diff(model, blip2.vision_model, blip2.qformer, blip2.query_tokens,
                                    blip2.language_projection)
    blip2.save_pretrained(directory)
    processor.save_pretrained(directory)

    defaults = model.chat_defaults
    template = get_template(defaults.template, model.tokenizer)
    prompt = template.render([Message("user", QUESTION, images=1)], defaults.system)
    decoding = defaults.decoding()
    if not decoding["do_sample"]:
        for name in ("temperature", "top_p", "top_k"):
            decoding.pop(name)
    stop_strings = [s for s in template.stop if s != tokenizer.eos_token]
    GenerationConfig(
        **decoding,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[image_token_id],
        **({"stop_strings": stop_strings} if stop_strings else {}),
    ).save_pretrained(directory)
    (directory / "README.md").write_text(model_card(prompt, num_queries, image_token_id, template.add_bos,
                                                     stop_strings, diff))
    log.info("exported to %s: image token %d, image embeddings within %.2e of ours", directory, image_token_id, diff)
    return ExportReport(directory, image_token_id, prompt, diff)


def model_card(prompt: str, num_image_tokens: int, image_token_id: int, add_bos: bool, stop_strings: list[str],
               image_embeds_max_diff: float) -> str:
    """The folder's README.md: what it is and a script using transformers alone (the recipe inlined)."""
    cut = "".join(f"    answer = answer.split({s!r})[0]\n" for s in stop_strings)
    return f'''---
library_name: transformers
pipeline_tag: image-text-to-text
---
# MiniGPT-4 in transformers' BLIP-2 form

Exported by `minigpt4 export --format transformers`. It loads in plain transformers
(`Blip2ForConditionalGeneration`, no `trust_remote_code`): EVA-ViT-g as `vision_model`
(MiniGPT-4's `ln_vision` as `post_layernorm`), the Q-Former, MiniGPT-4's projection as
`language_projection`, and the LLM as `language_model`.

MiniGPT-4 puts the image in the *middle* of its prompt, and its text pieces are tokenized
separately (each without special tokens, BOS once at the start). `Blip2Processor` would put the
image tokens in front, so build `input_ids` as below: {num_image_tokens} copies of the image token
(`{IMAGE_TOKEN}`, id {image_token_id}) where the prompt says `<ImageHere>`.

`post_layernorm` uses the ViT blocks' eps where MiniGPT-4's `ln_vision` uses 1e-5 (transformers
has one `layer_norm_eps` for both); on a random probe image the image embeddings stay within
{image_embeds_max_diff:.1e} of MiniGPT-4's own.

```python
import copy

import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

PROMPT = {prompt!r}
NUM_IMAGE_TOKENS = {num_image_tokens}
ADD_BOS = {add_bos}


def build_inputs(tokenizer, prompt, num_image_tokens, image_token_id, add_bos=True):
    """MiniGPT-4's layout: [BOS] text piece, image tokens, text piece, ... (pieces tokenized alone)."""
    ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    pieces = prompt.split("<ImageHere>")
    for index, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if index < len(pieces) - 1:
            ids += [image_token_id] * num_image_tokens
    return ids


def answer(model, processor, image, question, **generate_kwargs):
    tokenizer = processor.tokenizer
    pixel_values = processor.image_processor(image.convert("RGB"), return_tensors="pt").pixel_values
    input_ids = build_inputs(tokenizer, PROMPT.replace("{QUESTION}", question.strip()), NUM_IMAGE_TOKENS,
                             model.config.image_token_id, ADD_BOS)
    # Blip2's generate hands over to its language model, whose own generation config is not this folder's.
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.update(**generate_kwargs)
    if not generation_config.do_sample:  # greedy: the sampling settings do not apply
        generation_config.temperature = generation_config.top_p = generation_config.top_k = None
    output = model.generate(pixel_values=pixel_values.to(model.dtype), input_ids=torch.tensor([input_ids]),
                            generation_config=generation_config, tokenizer=tokenizer)
    answer = tokenizer.decode(output[0, len(input_ids):], skip_special_tokens=True)
{cut}    return answer.strip()


if __name__ == "__main__":
    import sys

    folder, image, question = sys.argv[1:4]
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")  # MiniGPT-4 resizes with PIL
    print(answer(model, processor, Image.open(image), question, do_sample=False))
```

Saved as `card.py`: `python card.py THIS_FOLDER IMAGE "QUESTION"` prints the greedy answer.
`generation_config.json` holds the model's own decoding (the call above overrides it with greedy);
it suppresses the image token as an output and stops at the template's stop strings. One difference
remains: transformers' `repetition_penalty` also counts the prompt's tokens, MiniGPT-4's chat only the
answer's, so answers agree exactly only at 1.0.
'''


def is_transformers_export(directory: Path) -> bool:
    """Whether `directory/config.json` is a BLIP-2 config (a folder `export_transformers` writes)."""
    path = directory / "config.json"
    return path.is_file() and read_json_object(path).get("model_type") == "blip-2"


def _tokenizer_without_image_token(directory: Path, pad_token: str) -> PreTrainedTokenizerBase:
    """The exported tokenizer minus the image token, so text reads as it did before export (a typed
    "<image>" is plain text again). The tokenizer file is edited in a temporary copy of its files;
    transformers has no call that removes an added token."""
    import json
    import shutil
    import tempfile

    from minigpt4.model.llm import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="minigpt4-tokenizer-") as scratch:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (directory / name).is_file():
                shutil.copy(directory / name, Path(scratch) / name)
        path = Path(scratch) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json: not a folder written by minigpt4 export")
        data = json.loads(path.read_text())
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != IMAGE_TOKEN]
        path.write_text(json.dumps(data))
        return load_tokenizer(scratch, pad_token)


def import_transformers(directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None):
    """A `MiniGPT4` from a folder `export_transformers` wrote (the inverse; read by transformers, strictly)."""
    from transformers import Blip2ForConditionalGeneration

    from minigpt4.chat.defaults import ChatDefaults
    from minigpt4.model.llm import DTYPES, check_loading_report
    from minigpt4.model.minigpt4 import MiniGPT4

    directory = Path(directory)
    source = str(directory / "config.json")
    entry = read_json_object(directory / "config.json").get("minigpt4")
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS or entry["format_version"] != EXPORT_VERSION:
        raise CheckpointError(f"{source}: a BLIP-2 config without a 'minigpt4' entry of version {EXPORT_VERSION}: "
                              "only folders written by `minigpt4 export --format transformers` load as MiniGPT-4")
    try:
        config = from_dict(ModelConfig, entry["model"], prefix="model.")
    except ConfigError as err:
        raise CheckpointError(f"{source}: minigpt4.{err}") from err
    config.llm.path = ""  # the LLM lives in this folder; save_pretrained then stores it with the model
    if device is not None:
        config.device = str(device)
    from minigpt4.precision import name_of, resolve_dtype

    config.dtype = name_of(dtype if dtype is not None else resolve_dtype(config.dtype, config.device)[0])
    blip2, report = Blip2ForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32)
    check_loading_report(blip2, report, str(directory))
    llm = blip2.language_model
    llm.resize_token_embeddings(int(entry["llm_vocab_size"]))  # drops the image token's rows
    # The export's decoding (suppressing the image token, template stops) is for transformers' generate; the
    # LLM gets what it would have had from its own config. The chat defaults carry the model's decoding.
    llm.generation_config = type(llm.generation_config).from_model_config(llm.config)
    tokenizer = _tokenizer_without_image_token(directory, config.llm.pad_token)
    model = MiniGPT4(config, llm, tokenizer, towers_on_meta=True)
    blip2_state = blip2.state_dict()
    model.load_tower_state_dict(towers_from_blip2(blip2_state), source=source)
    model.chat_defaults = ChatDefaults.from_record(entry["chat"], source)
    llm.requires_grad_(False)
    llm.config.use_cache = False
    model.lock()
    return model.place(config.device, DTYPES[config.dtype])
