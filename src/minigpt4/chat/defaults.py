"""How a model is talked to: its conversation template, system text and decoding defaults.

A model carries them, the way transformers models carry `chat_template` and `generation_config`:
`save_pretrained` records the template name and system text in `config.json` ("chat") and the
decoding in `generation_config.json` (written with transformers' `GenerationConfig`); a training
checkpoint records all three in its "chat" entry. `chat`, `caption`, `demo` and `serve` use them
unless a flag says otherwise, and say which they used and where each came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt4.chat.generation import GenerationSettings
from minigpt4.chat.templates import TEMPLATE_NAMES

GENERATION_CONFIG_NAME = "generation_config.json"
# The decoding a model records (GenerationSettings' other fields are per request: stop, seed, max_context).
DECODING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")  # transformers refuses to save these with do_sample=False
RELEASE = "the original release's defaults"


@dataclass
class ChatDefaults:
    """A model's conversation template, system text and decoding, with where each came from.

    The defaults are the released MiniGPT-4 demo's: `vicuna_v0`, sampling at temperature 1.0 with
    top-p 0.9 and top-k 50 (transformers' implicit top-k), 300 new tokens.

    Attributes:
        template: a name in `TEMPLATE_NAMES`.
        system: the system text; None uses the template's own, "" means none.
        generation: the decoding settings (only `DECODING_FIELDS` are recorded).
        template_source / generation_source: where the template and system / the decoding came from,
            for the messages that say which were used (not saved).
    """

    template: str = "vicuna_v0"
    system: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    template_source: str = RELEASE
    generation_source: str = RELEASE

    def __post_init__(self) -> None:
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template {self.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"system must be text or null, got {self.system!r}")

    @classmethod
    def for_release(cls, connector: str) -> ChatDefaults:
        """The release's defaults for a model with this connector: the Vicuna v0 releases' (qformer), or the
        Llama-2 release's (merge4): its `llama2` format and the repetition penalty 1.05 its chat applies."""
        if connector == "merge4":
            return cls(template="llama2", generation=GenerationSettings(repetition_penalty=1.05))
        return cls()

    @property
    def generation_recorded(self) -> bool:
        """Whether the decoding comes from the model's files (not the built-in release defaults)."""
        return not self.generation_source.startswith(RELEASE)

    def replace(self, **changes: Any) -> ChatDefaults:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ records

    def decoding(self) -> dict[str, Any]:
        return {name: getattr(self.generation, name) for name in DECODING_FIELDS}

    def record(self) -> dict[str, Any]:
        """A plain dict for a training checkpoint (tensors-and-containers only)."""
        return {"template": self.template, "system": self.system, "generation": self.decoding()}

    @classmethod
    def from_record(cls, record: Any, source: str) -> ChatDefaults:
        """The inverse of `record`; anything malformed is a CheckpointError naming `source`."""
        from minigpt4.convert import CheckpointError

        if not isinstance(record, dict) or set(record) != {"template", "system", "generation"}:
            raise CheckpointError(f"{source}: the chat entry must hold template, system and generation, got {record!r}")
        generation = decoding_settings(record["generation"], source)
        try:
            return cls(record["template"], record["system"], generation, source, source)
        except ValueError as err:
            raise CheckpointError(f"{source}: chat entry: {err}") from err

    def config_entry(self) -> dict[str, Any]:
        """What `save_pretrained` writes under "chat" in config.json."""
        return {"template": self.template, "system": self.system}

    def save_generation_config(self, directory: Path) -> None:
        """Write `generation_config.json` through transformers' GenerationConfig (readable by transformers too)."""
        from transformers import GenerationConfig

        values = self.decoding()
        if not values["do_sample"]:
            for name in SAMPLING_FIELDS:
                values.pop(name)
        GenerationConfig(**values).save_pretrained(directory)

    @classmethod
    def load(cls, directory: Path, entry: Any, config_path: Path) -> ChatDefaults:
        """Read a save_pretrained folder's "chat" entry (from `config_path`) and its generation_config.json.

        A folder written before models recorded these has neither: the release defaults apply, and
        the sources say so.
        """
        from minigpt4.convert import CheckpointError, read_json_object

        defaults = cls()
        if entry is not None:
            if not isinstance(entry, dict) or set(entry) != {"template", "system"}:
                raise CheckpointError(
                    f"{config_path}: 'chat' must be an object with template and system, got {entry!r}"
                )
            try:
                defaults = cls(entry["template"], entry["system"], template_source=str(config_path))
            except ValueError as err:
                raise CheckpointError(f"{config_path}: chat: {err}") from err
        else:
            defaults.template_source = f"{RELEASE}; {config_path} records none"
        path = directory / GENERATION_CONFIG_NAME
        if path.exists():
            values = read_json_object(path)
            values.pop("transformers_version", None)
            defaults.generation = decoding_settings(values, str(path))
            defaults.generation_source = str(path)
        else:
            defaults.generation_source = f"{RELEASE}; {directory} has no {GENERATION_CONFIG_NAME}"
        return defaults

    # ------------------------------------------------------------------ messages

    def describe(self) -> str:
        """E.g. "template vicuna_v0_train (from m/config.json), greedy, up to 300 new tokens
        (from m/generation_config.json)"."""
        return (f"template {self.template} (from {self.template_source}), "
                f"{describe_decoding(self.generation)} (from {self.generation_source})")


def describe_decoding(settings: GenerationSettings) -> str:
    if settings.do_sample:
        text = (f"sampling (temperature {settings.temperature:g}, top-p {settings.top_p:g}, "
                f"top-k {settings.top_k or 'off'}" + (f", {settings.num_beams} beams" if settings.num_beams > 1 else "")
                + ")")
    else:
        text = "greedy" if settings.num_beams == 1 else f"beam search ({settings.num_beams} beams)"
    if settings.repetition_penalty != 1.0:
        text += f", repetition penalty {settings.repetition_penalty:g}"
    return f"{text}, up to {settings.max_new_tokens} new tokens"


def decoding_settings(values: Any, source: str) -> GenerationSettings:
    """GenerationSettings from recorded decoding values; unknown keys, wrong types and ranges name `source`."""
    from minigpt4.config import ConfigError, from_dict
    from minigpt4.convert import CheckpointError

    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: decoding settings must be an object, got {json.dumps(values)[:80]}")
    unknown = sorted(set(values) - set(DECODING_FIELDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown decoding setting(s) {', '.join(unknown)}; "
                              f"a model records {', '.join(DECODING_FIELDS)}")
    try:
        return from_dict(GenerationSettings, {k: v for k, v in values.items() if v is not None})
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err
