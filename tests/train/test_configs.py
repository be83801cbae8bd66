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
