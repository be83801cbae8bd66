"""The frozen-feature cache: built through the training readers, refused when stale or when it cannot stand in
for augmentation, built by the CLI with the towers `minigpt4 train` builds, and usable under FSDP."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from minigpt4.config import ConfigError, train_config
from minigpt4.data import synthetic
from minigpt4.data.aligned import stage2_batches
from minigpt4.data.webdataset import stage1_batches
from minigpt4.feature_cache import (
    FeatureCache,
    StaleCacheError,
    build_cache,
    cached_batches,
    data_transform,
    feature_batches,
)
from minigpt4.model.build import build_job_model
from minigpt4.processing.image import eval_transform, train_transform
from minigpt4.train.loop import train

from .conftest import REPO, cli_command, cli_env, overrides, read_log, run_cli

CONFIG = REPO / "configs" / "tiny_stage1.yaml"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _first_pass(batches, kept: int) -> tuple[list[str], set[tuple[str, str, str]]]:
    """Keys of the first `kept` batches of 1 and every skip reported up to the next one (one pass, all skips:
    the skips after the last kept sample arrive with the next batch; the next pass repeats the same ones)."""
    taken = [next(batches) for _ in range(kept + 1)]
    keys = [batch["key"][0] for batch in taken[:kept]]
    return keys, {(s.source, s.key, s.reason) for batch in taken for s in batch["skipped"]}


def test_cache_keeps_and_skips_exactly_what_training_reads(tmp_path, tiny_model):
    """Empty captions, a .webp image, a corrupt image, no caption, a member over max_image_bytes and a truncated tar:
    the cache keeps the keys the training readers keep and skips (and counts) the samples they skip, for shards and
    for an aligned folder."""
    images = [synthetic.draw_scene(seed, size=32)[0] for seed in range(8)]
    noise = Image.fromarray(torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8).numpy())  # ~49 kB as PNG
    limit = 40_000  # data.max_image_bytes for both readers
    shards = tmp_path / "shards"
    shards.mkdir()

    def sample(key: str, image: bytes | None, ext: str = "jpg", caption: str | None = "a red circle") -> dict:
        out = {"__key__": key}
        if image is not None:
            out[ext] = image
        if caption is not None:
            out["json"] = json.dumps({"caption": caption}).encode()
        return out

    with TarWriter(str(shards / "00000.tar"), mtime=0) as writer:
        for entry in (sample("good-jpg", _encoded(images[0], "JPEG")),
                      sample("webp", _encoded(images[1], "WEBP"), ext="webp"),
                      sample("empty-caption", _encoded(images[2], "JPEG"), caption="  "),
                      sample("punctuation-only", _encoded(images[2], "JPEG"), caption="!!! ..."),
                      sample("corrupt", b"not an image"),
                      sample("no-caption", _encoded(images[3], "JPEG"), caption=None),
                      sample("no-image", None),
                      sample("too-large", _encoded(noise, "PNG"), ext="png"),
                      sample("good-png", _encoded(images[4], "PNG"), ext="png")):
            writer.write(entry)
    with TarWriter(str(shards / "00001.tar"), mtime=0) as writer:
        for index in range(3):
            writer.write(sample(f"second-{index}", _encoded(images[5 + index], "JPEG")))
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[: len(whole) * 3 // 4])  # cut inside the last sample

    aligned = tmp_path / "aligned"
    synthetic.write_stage2(aligned, [(str(i), images[i], f"A shape number {i}.") for i in range(6)])
    annotations = json.loads((aligned / "filter_cap.json").read_text())
    annotations["annotations"][1]["caption"] = " "
    annotations["annotations"][2]["caption"] = None
    annotations["annotations"].append({"image_id": "missing", "caption": "no such image"})
    (aligned / "filter_cap.json").write_text(json.dumps(annotations))
    (aligned / "image" / "3.jpg").write_bytes(b"\xff\xd8 truncated jpeg")

    transform = eval_transform(tiny_model.config.vision.image_size)
    count, skipped = build_cache(tiny_model, [("webdataset", str(shards)), ("aligned", str(aligned))],
                                 tmp_path / "cache", transform, batch_size=3, seed=5, max_image_bytes=limit)
    cache = FeatureCache(tmp_path / "cache", tiny_model, transform)
    cached_keys = [[sample.key for sample in dataset] for dataset in cache.datasets]
    cached_skips = {(s.source, s.key, s.reason) for s in skipped}

    shard_keys, shard_skips = _first_pass(
        stage1_batches([(str(shards), 1.0)], transform, 1, seed=5, shuffle_buffer=0, max_image_bytes=limit),
        len(cached_keys[0]))
    aligned_keys, aligned_skips = _first_pass(stage2_batches(str(aligned), transform, 1, seed=5,
                                                             max_image_bytes=limit), len(cached_keys[1]))
    assert sorted(cached_keys[0]) == sorted(shard_keys)
    assert {"good-jpg", "webp", "good-png", "second-0"} <= set(cached_keys[0])
    assert sorted(cached_keys[1]) == sorted(aligned_keys) == ["0", "4", "5"]
    assert cached_skips == shard_skips | aligned_skips
    reasons = {reason.split(":")[0] for _, _, reason in cached_skips}
    assert {"empty caption", "corrupt image", "no caption", "no image", "truncated tar", "missing image",
            "too large"} <= reasons
    assert count == len(shard_keys) + 3 and cache.manifest["skipped"] == len(skipped) == len(cached_skips)
    webp = next(s for s in cache.datasets[0] if s.key == "webp")
    expected = tiny_model.frozen_features(transform(images[1].convert("RGB")).unsqueeze(0))[0]
    torch.testing.assert_close(cache.features(webp, 0).float(), expected, atol=2e-2, rtol=2e-2)


def test_a_dataset_with_no_usable_sample_is_an_error(tmp_path, tiny_model):
    aligned = tmp_path / "aligned"
    synthetic.write_stage2(aligned, [("0", synthetic.draw_scene(0, size=32)[0], " ")])
    with pytest.raises(ValueError, match="no usable sample .*1 empty caption"):
        build_cache(tiny_model, [("aligned", str(aligned))], tmp_path / "cache", eval_transform(224))


def test_feature_cache_roundtrip_resume_and_staleness(tmp_path, tiny_model):
    data = synthetic.generate(tmp_path / "data", num_stage1=6, num_stage2=6, num_validation=1, num_test=1,
                              include_photos=False)
    (data.stage2.parent / "image" / "shape5.jpg").write_bytes(b"not a jpeg")  # skipped and counted
    transform = eval_transform(224)
    count, skipped = build_cache(
        tiny_model, [("webdataset", data.stage1_shards), ("conversations", str(data.stage2))], tmp_path / "cache",
        transform, batch_size=4
    )
    assert count == 11 and [s.key for s in skipped] == ["shape5"]
    cache = FeatureCache(tmp_path / "cache", tiny_model, transform)
    sample = cache.datasets[1][0]
    image = Image.open(data.stage2.parent / "image" / f"{sample.key}.jpg")
    expected = tiny_model.frozen_features(transform(image).unsqueeze(0))
    assert torch.allclose(cache.features(sample, 0).float(), expected[0], atol=2e-2)

    batches = feature_batches(cache, 2, seed=3, ratios=[1.0, 1.0])
    first = [next(batches) for _ in range(5)]
    resumed = next(feature_batches(cache, 2, seed=3, ratios=[1.0, 1.0], start_batch=4))
    assert resumed["key"] == first[4]["key"] and torch.equal(resumed["features"], first[4]["features"])
    assert first[0]["features"].shape == (2, *expected.shape[1:]) and first[0]["features"].dtype == torch.float32

    with pytest.raises(StaleCacheError, match="another image transform"):
        FeatureCache(tmp_path / "cache", tiny_model, train_transform(224))
    with torch.no_grad():
        tiny_model.vision.encoder.layers[0].mlp.fc1.weight.add_(0.01)
    with pytest.raises(StaleCacheError, match="minigpt4 cache-features"):
        FeatureCache(tmp_path / "cache", tiny_model, transform)


def test_views_are_split_over_ranks_as_one_process_sees_them(tmp_path, tiny_model):
    """With several views, the two ranks' halves of a step hold the samples and views one process's batch holds."""
    data = synthetic.generate(tmp_path / "data", num_stage1=8, num_stage2=1, num_validation=1, num_test=1,
                              include_photos=False)
    build_cache(tiny_model, [("webdataset", data.stage1_shards)], tmp_path / "cache", train_transform(224), views=3)
    cache = FeatureCache(tmp_path / "cache")
    one = next(feature_batches(cache, 4, seed=1))
    halves = [next(feature_batches(cache, 2, seed=1, rank=rank, world_size=2)) for rank in (0, 1)]
    assert sorted(one["key"]) == sorted(halves[0]["key"] + halves[1]["key"])
    by_key = {key: feats for half in halves for key, feats in zip(half["key"], half["features"])}
    for key, feats in zip(one["key"], one["features"]):
        assert torch.equal(by_key[key], feats)
    stored = cache.features(cache.datasets[0][0], slice(None))  # (views, N, C): three different crops
    assert not torch.equal(stored[0], stored[1]) and not torch.equal(stored[1], stored[2])


def _job(tiny_llm_dir: Path, tmp_path: Path, datasets: list[dict], *extra: str):
    return train_config(CONFIG, overrides(tiny_llm_dir, tmp_path / "run", datasets, "train.tensorboard=false",
                                          *extra))


def test_augment_with_a_one_view_cache_is_refused(tmp_path, tiny_llm_dir, tiny_data, capsys):
    """A one-view cache cannot stand in for random crops: both the builder and training say what to do."""
    from minigpt4.cli import main

    datasets = [{"kind": "webdataset", "path": tiny_data.one_shard}]
    args = overrides(tiny_llm_dir, tmp_path / "run", datasets, "data.augment=true")
    assert main(["cache-features", str(CONFIG), *args, "--output", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: data.augment=true") and "--views" in error and "data.augment=false" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "refused").exists()

    cfg = _job(tiny_llm_dir, tmp_path, datasets, "data.augment=true", f"data.feature_cache={tmp_path / 'cache'}")
    model = build_job_model(cfg)
    build_cache(model, [("webdataset", tiny_data.one_shard)], tmp_path / "cache", data_transform(cfg), views=1)
    with pytest.raises(ConfigError, match=r"1 view per image.*--views 4.*data\.augment=false"):
        cached_batches(cfg, model)
    build_cache(model, [("webdataset", tiny_data.one_shard)], tmp_path / "cache", data_transform(cfg), views=2)
    assert next(cached_batches(cfg, model))["features"].shape[0] == cfg.data.batch_size


def test_training_reads_the_feature_cache_and_never_runs_the_tower(tmp_path, tiny_llm_dir, monkeypatch):
    data = synthetic.generate(tmp_path / "data", num_stage1=8, num_stage2=1, num_validation=1, num_test=1,
                              include_photos=False)
    datasets = [{"kind": "webdataset", "path": data.stage1_shards}]
    extra = ["data.augment=false", "train.epochs=1", "train.iters_per_epoch=3", "model.vision.image_size=224"]
    cfg = _job(tiny_llm_dir, tmp_path, datasets, *extra, f"data.feature_cache={tmp_path / 'cache'}")
    build_cache(build_job_model(cfg), [("webdataset", data.stage1_shards)], tmp_path / "cache", data_transform(cfg),
                batch_size=4)
    from minigpt4.model.vision import EvaViT

    monkeypatch.setattr(EvaViT, "forward", lambda *a: pytest.fail("training from the cache must not run the tower"))
    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))

    with pytest.raises(StaleCacheError, match="other frozen weights or another image transform"):
        train(_job(tiny_llm_dir, tmp_path, datasets, *extra, f"data.feature_cache={tmp_path / 'cache'}",
                   "train.seed=7"))  # other random towers
    with pytest.raises(ConfigError, match="1 view per image"):  # what to do, before "stale"
        train(_job(tiny_llm_dir, tmp_path, datasets, *extra[1:], f"data.feature_cache={tmp_path / 'cache'}",
                   "data.augment=true"))


def test_cli_cache_is_accepted_by_cli_train_with_the_loss_of_pixels(tmp_path, tiny_llm_dir, tiny_data):
    """`minigpt4 cache-features` builds the random tiny towers as `minigpt4 train` does: the cache is accepted,
    and the first step's loss equals the loss of training from pixels (one batch = the whole folder)."""
    datasets = [{"kind": "aligned", "path": str(tiny_data.aligned)}]
    common = ["data.augment=false", "data.batch_size=24", "train.epochs=1", "train.iters_per_epoch=1",
              "train.tensorboard=false"]
    build = [sys.executable, "-m", "minigpt4.cli", "cache-features", str(CONFIG),
             *overrides(tiny_llm_dir, tmp_path / "unused", datasets, *common), "--output", str(tmp_path / "cache")]
    proc = subprocess.run(build, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cached 24 images" in proc.stdout

    run_cli("tiny_stage1.yaml", overrides(tiny_llm_dir, tmp_path / "cached", datasets, *common,
                                          f"data.feature_cache={tmp_path / 'cache'}"))
    from_pixels = train(_job(tiny_llm_dir, tmp_path, datasets, *common))
    assert from_pixels.final_loss > 1.0
    assert read_log(tmp_path / "cached")[1]["loss"] == pytest.approx(from_pixels.losses[0], rel=1e-3)


def test_fsdp_trains_from_the_feature_cache(tmp_path, tiny_llm_dir, tiny_data):
    """torchrun, 2 CPU processes, train.strategy=fsdp, data.feature_cache: the fingerprint is taken on the gathered
    frozen weights (the cache is accepted) and the losses are those of one process with the whole batch."""
    datasets = [{"kind": "webdataset", "path": tiny_data.one_shard}]
    common = ["data.augment=false", "train.epochs=1", "train.iters_per_epoch=3", "train.tensorboard=false",
              f"data.feature_cache={tmp_path / 'cache'}"]
    cfg = train_config(CONFIG, overrides(tiny_llm_dir, tmp_path / "one", datasets, *common, "data.batch_size=8"))
    build_cache(build_job_model(cfg), [("webdataset", tiny_data.one_shard)], tmp_path / "cache", data_transform(cfg),
                batch_size=16)
    one = train(cfg)

    command = cli_command("tiny_stage1.yaml", overrides(tiny_llm_dir, tmp_path / "fsdp", datasets, *common,
                                                        "train.strategy=fsdp", "data.batch_size=4"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command[1:]]
    proc = subprocess.run(torchrun, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP: 2 LLM layers" in proc.stderr
    fsdp = read_log(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3]
    assert [fsdp[step]["loss"] for step in (1, 2, 3)] == pytest.approx(one.losses, rel=1e-5)


def test_rebuilding_never_leaves_a_cache_that_reads_as_whole(tmp_path, tiny_model, monkeypatch):
    """A rebuild removes the old manifest before writing (a half-built cache is refused, not read with shards
    that now hold other samples) and the old shards; a folder whose manifest.json is not a cache's is left alone."""
    images = [synthetic.draw_scene(seed, size=32)[0] for seed in range(6)]
    aligned = tmp_path / "aligned"
    synthetic.write_stage2(aligned, [(str(i), image, f"Shape {i}.") for i, image in enumerate(images)])
    transform = eval_transform(224)
    build_cache(tiny_model, [("aligned", str(aligned))], tmp_path / "cache", transform, batch_size=2, shard_size=2)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 3

    calls = []
    real = type(tiny_model).frozen_features

    def fail_on_second_batch(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(self, pixels)

    monkeypatch.setattr(type(tiny_model), "frozen_features", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(tiny_model, [("aligned", str(aligned))], tmp_path / "cache", transform, batch_size=2, shard_size=2)
    with pytest.raises(FileNotFoundError, match="no manifest.json; build it with `minigpt4 cache-features`"):
        FeatureCache(tmp_path / "cache", tiny_model, transform)
    monkeypatch.undo()

    small = tmp_path / "small"
    synthetic.write_stage2(small, [("0", images[0], "Shape 0.")])
    build_cache(tiny_model, [("aligned", str(small))], tmp_path / "cache", transform, shard_size=2)
    assert [p.name for p in (tmp_path / "cache").glob("features-*.safetensors")] == ["features-00000.safetensors"]
    assert [s.key for s in FeatureCache(tmp_path / "cache", tiny_model, transform).datasets[0]] == ["0"]

    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(ValueError, match="not a feature cache's manifest"):
        build_cache(tiny_model, [("aligned", str(small))], foreign, transform)
    assert (foreign / "manifest.json").read_text() == '{"name": "something else"}'


def test_cli_errors_are_one_line(tmp_path, tiny_llm_dir, tiny_data, capsys):
    """cache-features: a missing LLM folder, a missing dataset, bad flags; train: a stale cache."""
    from minigpt4.cli import main

    datasets = [{"kind": "aligned", "path": str(tiny_data.aligned)}]
    args = overrides(tiny_llm_dir, tmp_path / "run", datasets, "data.augment=false")
    cases = [
        ([*args, "model.llm.path=/nonexistent/llm"], "model.llm.path='/nonexistent/llm' is not a folder"),
        (overrides(tiny_llm_dir, tmp_path / "run", [{"kind": "aligned", "path": str(tmp_path / "nowhere")}],
                   "data.augment=false"), "filter_cap.json not found"),
        ([*args, "--views", "0"], "--views must be at least 1"),
    ]
    for case, message in cases:
        assert main(["cache-features", str(CONFIG), *case, "--output", str(tmp_path / "cache")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1, error
        assert not (tmp_path / "cache").exists()  # refused before any work

    assert main(["cache-features", str(CONFIG), *args, "--output", str(tmp_path / "cache")]) == 0
    assert "train from it with: data.feature_cache=" in capsys.readouterr().out
    stale = [*args, "model.vision.image_size=70", f"data.feature_cache={tmp_path / 'cache'}"]
    assert main(["train", str(CONFIG), *stale]) == 2
    captured = capsys.readouterr()
    said = (captured.out + captured.err).strip()
    assert "feature cache" in said and "minigpt4 cache-features" in said and "Traceback" not in said


def test_fingerprint_hashes_the_weights_bytes_without_copying_them(tiny_model):
    """The fingerprint is blake2b over each frozen tensor's name, shape, dtype and bytes, then the transform: the
    digest caches built before the no-copy hashing hold (and any change to one weight changes it)."""
    import hashlib

    from minigpt4.feature_cache.layout import fingerprint

    transform = eval_transform(tiny_model.config.vision.image_size)
    expected = hashlib.blake2b(digest_size=16)
    modules = {"vision": tiny_model.vision, "ln_vision": tiny_model.ln_vision}
    if not tiny_model.config.qformer.trainable:
        modules["qformer"] = tiny_model.qformer
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            expected.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            expected.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    expected.update(repr(transform).encode())
    assert fingerprint(tiny_model, transform) == expected.hexdigest()
    with torch.no_grad():
        tiny_model.ln_vision.weight[0] += 1.0
    assert fingerprint(tiny_model, transform) != expected.hexdigest()
