"""The shipped training configs reproduce the original runs (reference §3.2, §5)."""

import pytest

from minigpt4.config import ConfigError, train_config
from minigpt4.data.prompts import load_prompts
from minigpt4.train.schedule import lr_at

from .conftest import REPO


def test_stage1_config_is_the_original_run():
    cfg = train_config(REPO / "configs" / "stage1_pretrain.yaml")
    d, t = cfg.data, cfg.train
    assert [(s.kind, s.ratio) for s in d.datasets] == [("webdataset", 115.0), ("webdataset", 14.0)]
    assert (d.batch_size, d.prompts, d.end_sym, d.max_txt_len, d.process_captions) == (64, "", "\n", 32, True)
    schedule = (t.lr, t.min_lr, t.warmup_lr, t.warmup_steps, t.epochs, t.iters_per_epoch)
    assert schedule == (1e-4, 8e-5, 1e-6, 5000, 4, 5000)
    assert (t.weight_decay, t.betas, t.precision, t.seed, t.grad_accum) == (0.05, (0.9, 0.999), "fp16", 42, 1)
    assert lr_at(5000, t) == pytest.approx(9.7071e-5, rel=1e-4)
    assert cfg.model.qformer.num_query_tokens == 32 and not cfg.model.qformer.trainable


def test_stage2_config_is_the_original_run():
    cfg = train_config(REPO / "configs" / "stage2_finetune.yaml")
    d, t = cfg.data, cfg.train
    assert [s.kind for s in d.datasets] == ["aligned"]
    assert (d.batch_size, d.end_sym, d.max_txt_len, d.process_captions) == (12, "###", 160, False)
    prompts = load_prompts(None, d.prompt_template)
    assert len(prompts) == 4
    assert all(p.startswith("###Human: <Img><ImageHere></Img> ") and p.endswith(" ###Assistant: ") for p in prompts)
    assert (t.lr, t.min_lr, t.warmup_lr, t.warmup_steps, t.epochs, t.iters_per_epoch) == (3e-5, 1e-5, 1e-6, 200, 5, 200)
    assert lr_at(200, t) == pytest.approx(2.8090e-5, rel=1e-4)
    assert cfg.model.weights.projection.endswith(".pth")


def test_llama2_configs_are_the_release_runs():
    stage1 = train_config(REPO / "configs" / "stage1_pretrain_llama2.yaml")
    stage2 = train_config(REPO / "configs" / "stage2_finetune_llama2.yaml")
    for cfg in (stage1, stage2):
        assert cfg.preset == "minigpt4-llama2-7b" and cfg.model.connector == "merge4"
        assert cfg.model.llm.pad_token == "$$" and cfg.model.num_image_tokens == 64
        assert cfg.model.weights.vit and not cfg.model.weights.blip2  # no Q-Former file for this release
    d, t = stage1.data, stage1.train
    assert (d.batch_size, d.prompts, d.end_sym, d.max_txt_len, d.process_captions) == (64, "", "\n", 32, True)
    schedule = (t.lr, t.min_lr, t.warmup_lr, t.warmup_steps, t.epochs, t.iters_per_epoch)
    assert schedule == (1e-4, 8e-5, 1e-6, 5000, 4, 5000)
    d, t = stage2.data, stage2.train
    assert (d.batch_size, d.end_sym, d.max_txt_len, d.process_captions) == (12, "</s>", 160, False)
    prompts = load_prompts(None, d.prompt_template)
    assert len(prompts) == 4
    assert all(p.startswith("[INST] <Img><ImageHere></Img> ") and p.endswith(" [/INST] ") for p in prompts)
    assert (t.lr, t.min_lr, t.warmup_lr, t.warmup_steps, t.epochs, t.iters_per_epoch) == (3e-5, 1e-5, 1e-6, 200, 5, 200)
    assert (t.weight_decay, t.precision, t.seed) == (0.05, "fp16", 42)
    assert stage2.model.weights.projection.endswith(".pth")


def test_overrides_and_unknown_keys():
    cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", ["train.lr=3e-5", "data.batch_size=2"])
    assert cfg.train.lr == 3e-5 and cfg.data.batch_size == 2
    assert cfg.model.vision.width == 32  # the tiny preset under the YAML's model section
    with pytest.raises(ConfigError, match="train.lrr"):
        train_config(REPO / "configs" / "tiny_stage1.yaml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].kind"):
        train_config(None, ["data.datasets=[{kind: tar, path: x}]"])
    with pytest.raises(ConfigError, match="unknown model preset"):
        train_config(None, ["preset=huge"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.save_every=-1", r"train\.save_every=-1 is out of range: set it >= 0 \(default 0\)"),
        ("train.clip_grad_norm=-1.0", r"train\.clip_grad_norm=-1\.0 is out of range: set it >= 0"),
        ("train.warmup_steps=-5", r"train\.warmup_steps=-5 is out of range: set it >= 0 \(default 5000\)"),
        ("train.lr=0", r"train\.lr=0\.0 is out of range: set it > 0 \(default 0\.0001\)"),
        ("train.lr=-1e-4", r"train\.lr=-0\.0001 is out of range: set it > 0"),
        ("train.eps=0", r"train\.eps=0\.0 is out of range: set it > 0"),
        ("train.weight_decay=-0.05", r"train\.weight_decay=-0\.05 is out of range: set it >= 0"),
        ("data.num_workers=-1", r"data\.num_workers=-1 is out of range: set it >= 0 \(default 4\)"),
        ("data.datasets=[{kind: webdataset, path: x, ratio: 0}]",
         r"data\.datasets\[0\]\.ratio=0\.0 is out of range: set it > 0 \(default 1\.0\)"),
        ("train.betas=[0.9, 1.0]", r"train\.betas=\(0\.9, 1\.0\) is out of range: set each item in \[0, 1\)"),
        ("train.betas=[-0.1, 0.999]", r"train\.betas=\(-0\.1, 0\.999\) is out of range: set each item in \[0, 1\)"),
        ("train.lr=.nan", r"train\.lr=nan is not a finite number: set a finite value > 0"),
        ("train.min_lr=inf", r"train\.min_lr=inf is not a finite number"),
        ("train.betas=[.nan, 0.999]", r"train\.betas=\(nan, 0\.999\) is not a finite number"),
        ("model.qformer.dropout=-inf", r"model\.qformer\.dropout=-inf is not a finite number"),
        ("model.vision.layer_norm_eps=0", r"model\.vision\.layer_norm_eps=0\.0 is out of range: set it > 0"),
        ("data.batch_size=0", r"data\.batch_size=0 is out of range: set it >= 1"),
        ("train.epochs=0", r"train\.epochs=0 is out of range: set it >= 1"),
        ("train.max_nonfinite_steps=0", r"train\.max_nonfinite_steps=0 is out of range: set it >= 1"),
        ("train.seed=-3", r"train\.seed=-3 is out of range"),
    ],
)
def test_every_number_is_range_checked_naming_key_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        train_config(REPO / "configs" / "tiny_stage1.yaml", [override])


def test_ranges_are_checked_again_on_configs_edited_in_python(tiny_llm_dir, tmp_path):
    from minigpt4.train.loop import train

    cfg = train_config(REPO / "configs" / "tiny_stage1.yaml", ["data.datasets=[{kind: webdataset, path: x}]"])
    cfg.train.weight_decay = float("nan")
    with pytest.raises(ConfigError, match=r"train\.weight_decay=nan is not a finite number"):
        train(cfg)  # before building anything


def test_every_number_field_of_the_training_config_declares_a_range():
    import dataclasses
    import typing

    from minigpt4.config import DatasetSource, TrainJobConfig

    def unbounded(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from unbounded(hints[f.name], f"{prefix}{f.name}.")
            elif isinstance(f.default, (int, float, tuple)) and not isinstance(f.default, bool):
                if "bounds" not in f.metadata:
                    yield prefix + f.name

    assert list(unbounded(TrainJobConfig)) + list(unbounded(DatasetSource)) == []
