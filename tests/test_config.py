"""Typed configs: defaults, YAML and command-line overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from minigpt4.config import ConfigError, ModelConfig, load_config, model_config, parse_overrides


def test_yaml_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vision:\n  depth: 12\nllm:\n  path: /models/vicuna\n")
    cfg = load_config(ModelConfig, path, ["qformer.num_query_tokens=16", "dtype=bfloat16"])
    assert cfg.vision.depth == 12 and cfg.vision.width == 1408
    assert cfg.llm.path == "/models/vicuna" and cfg.qformer.num_query_tokens == 16 and cfg.dtype == "bfloat16"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) vision\.detph"):
        load_config(ModelConfig, None, ["vision.detph=3"])
    path = tmp_path / "m.yaml"
    path.write_text("qformr: {}\n")
    with pytest.raises(ConfigError, match="qformr"):
        load_config(ModelConfig, path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("vision.depth=deep", r"vision\.depth: expected an integer"),
        ("vision.depth=1.5", r"vision\.depth: expected an integer"),
        ("qformer.trainable=3", r"qformer\.trainable: expected true/false"),
        ("dtype=float64", r"dtype: 'float64' is not one of"),
        ("vision=3", r"vision: expected a mapping"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ModelConfig, None, [override])


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x y", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x y"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["novalue"])


def test_presets_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vision:\n  depth: 3\n")
    cfg = model_config("tiny", path, ["vision.width=48"])
    assert (cfg.vision.depth, cfg.vision.width, cfg.qformer.hidden_size) == (3, 48, 32)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("huge")
