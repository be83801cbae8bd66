"""Speed switches keep the loss, and the benchmark entry point runs (tiny dims, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE, layout_batch


def _tiny_job(tmp_path, tiny_llm_dir, aligned, **extra):
    from minigpt4.config import train_config

    overrides = {
        "preset": "tiny", "model.llm.path": str(tiny_llm_dir), "model.vision.image_size": 56,
        "data.datasets": json.dumps([{"kind": "aligned", "path": str(aligned)}]), "data.batch_size": 4,
        "data.num_workers": 0, "data.augment": "false", "data.prompts": "default",
        "data.prompt_template": f"'{VICUNA_V0_TEMPLATE}'", "data.end_sym": "'###'", "data.max_txt_len": 160,
        "train.epochs": 1, "train.iters_per_epoch": 1, "train.precision": "fp32", "train.tensorboard": "false",
        "train.output_dir": str(tmp_path / "run"), "train.warmup_steps": 1, **extra,
    }
    return train_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def aligned_folder(tmp_path):
    """4 drawn images with descriptions of different lengths (a cc_sbu_align-style folder)."""
    from minigpt4.data.synthetic import draw_scene, write_stage2

    items = []
    for i in range(4):
        image, scene = draw_scene(i, size=64)
        items.append((f"{i:03d}", image, " ".join([scene.description()] * (i + 1))))
    write_stage2(tmp_path / "aligned", items)
    return tmp_path / "aligned"


def test_cached_uncached_and_bucketed_training_give_the_same_loss(tmp_path, tiny_llm_dir, aligned_folder):
    """`train()` from the frozen-feature cache (and with length buckets) computes the loss of the same batch as
    from pixels (eval transform)."""
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_job_model
    from minigpt4.train.loop import train

    uncached = _tiny_job(tmp_path / "pixels", tiny_llm_dir, aligned_folder)
    from_pixels = train(uncached)

    # The cache is made by the same frozen towers the training run builds (same seed -> same weights).
    model = build_job_model(uncached)
    build_cache(model, [("aligned", str(aligned_folder))], tmp_path / "cache", data_transform(uncached), batch_size=4)
    cached = _tiny_job(tmp_path / "features", tiny_llm_dir, aligned_folder,
                       **{"data.feature_cache": tmp_path / "cache"})
    from_cache = train(cached)

    # One batch = the whole folder in both runs, so both losses are means over the same target tokens;
    # the cache stores fp16, hence the tolerance.
    assert from_pixels.final_loss > 1.0
    assert from_cache.final_loss == pytest.approx(from_pixels.final_loss, rel=1e-3)

    # train.length_buckets: rows grouped by length, padding not computed, same loss.
    bucketed = train(_tiny_job(tmp_path / "buckets", tiny_llm_dir, aligned_folder, **{"train.length_buckets": 3}))
    assert bucketed.final_loss == pytest.approx(from_pixels.final_loss, rel=1e-5)


def test_length_buckets_and_full_logits_keep_loss_and_gradient(tiny_model):
    """Bucketing (padding not computed) and the full-logits baseline give the loss and gradient of the plain path."""
    texts = ["a cat", "a red circle on a white background " * 6, "the dog runs in the park", "a photo"]
    prompt = VICUNA_V0_TEMPLATE.format("<Img><ImageHere></Img> Describe this image in detail.")
    batch = layout_batch(tiny_model.tokenizer, texts, tiny_model.num_image_tokens, prompt, "###", 160)
    assert (batch.attention_mask == 0).any(), "the batch must hold padding for bucketing to matter"
    features = torch.randn(len(texts), tiny_model.num_image_tokens, tiny_model.config.qformer.hidden_size)

    def loss_and_grad(**switches):
        tiny_model.proj.weight.grad = None
        loss = tiny_model.lm_loss(tiny_model.embed(batch, tiny_model.project(features)), batch.attention_mask,
                                  batch.labels, **switches)
        loss.backward()
        return loss.detach(), tiny_model.proj.weight.grad.clone()

    plain_loss, plain_grad = loss_and_grad()
    for switches in ({"length_buckets": 2}, {"length_buckets": 4}, {"length_buckets": 9}, {"full_logits": True},
                     {"length_buckets": 3, "full_logits": True}):
        loss, grad = loss_and_grad(**switches)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6, msg=f"loss with {switches}")
        torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6, msg=f"gradient with {switches}")
    with pytest.raises(ValueError, match="length_buckets=0"):
        tiny_model.lm_loss(tiny_model.embed(batch, tiny_model.project(features)), batch.attention_mask, batch.labels,
                           length_buckets=0)


def test_benchmark_entry_point_smoke(tmp_path, capsys):
    """`python -m benchmarks.run` at tiny dims: ours and transformers' BLIP-2 against the original's settings,
    min/median/max over the timed steps, MFU under 100%, and the JSON file."""
    from benchmarks.run import main

    output = tmp_path / "bench.json"
    assert main(["--parts", "stage2", "chat", "--variants", "original,transformers,ours+cache", "--chat-variants",
                 "original,ours", "--batch-stage2", "2", "--steps", "3", "--new-tokens", "3", "--threads", "1",
                 "--in-process", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "| ours+cache |" in printed and "| transformers |" in printed and "| TTFT s |" in printed
    report = json.loads(output.read_text())
    train_rows = {r["variant"]: r for r in report["parts"]["stage2"]}
    assert train_rows["original"]["speedup"] == 1.0
    for row in train_rows.values():
        assert len(row["step_times"]) == 3
        assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
        assert 0 < row["mfu"] <= 1.0, row["variant"]
    assert train_rows["ours+cache"]["cache_build_s"] is not None
    assert train_rows["original"]["flops_per_step"] > train_rows["ours+cache"]["flops_per_step"] > 0
    # transformers' BLIP-2 holds the same weights: the same loss on the same batch (its post_layernorm eps
    # differs from ln_vision's, and the cache stores fp16)
    assert train_rows["transformers"]["loss_rel_diff"] < 0.01
    assert train_rows["ours+cache"]["loss_rel_diff"] < 0.01
    chat_rows = {r["variant"]: r for r in report["parts"]["chat"]}
    assert chat_rows["original"]["ttft_ratio"] == 1.0 and chat_rows["ours"]["ttft_s"] > 0
    # 3 tokens at tiny dims: the decode time may drown in a busy machine's noise, then it is reported as missing
    assert chat_rows["ours"]["decode_tok_s"] is None or chat_rows["ours"]["decode_tok_s"] > 0


def test_benchmark_needs_the_original_reference_and_three_steps():
    from benchmarks.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--variants", "ours,ours+cache"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "2"])
    assert parse_args(["--variants", "ours,original"]).variants["stage2"] == ["original", "ours"]


def test_decoding_without_cache_matches_generate(tiny_model):
    """The no-KV-cache curiosity (whole sequence recomputed per token) decodes what `generate` with a KV cache does."""
    from transformers import GenerationConfig

    from benchmarks.worker import decode_without_cache
    from minigpt4.chat.generation import encode_images, prepare_inputs
    from minigpt4.processing.prompt import pad_token_id

    image = torch.rand(3, 224, 224)
    prompts = ["<Img><ImageHere></Img> a photo of", "a red circle <Img><ImageHere></Img> and the dog runs in the park"]
    with torch.inference_mode():
        prepared = prepare_inputs(tiny_model, prompts, encode_images(tiny_model, [[image], [image]]))
        plain = decode_without_cache(tiny_model.llm, prepared.inputs_embeds, prepared.attention_mask, 6)
        config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                                  pad_token_id=pad_token_id(tiny_model.tokenizer))
        cached = tiny_model.llm.generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                                         generation_config=config)
    assert plain.shape == (2, 6)
    assert torch.equal(plain, cached[:, -6:])


def test_quickstart_seeds_table_reports_min_median_max_over_seeds(tmp_path, capsys):
    """The README's quickstart table: per-seed rows, then min/median/max of each column over the seeds."""
    from benchmarks import quickstart_seeds

    def summary(total: float, test_right: int) -> dict:
        score = {"images": 10, "colour_and_shape": test_right, "colour": test_right, "shape": 10,
                 "accuracy": test_right / 10}
        stage = {"final_loss": 0.5, "tokens_per_s": 100.0}
        return {"total_seconds": total, "seconds": {"features": 1, "stage1": 2, "stage2": 3}, "stage1": stage,
                "stage2": stage, "validation_stage1_captions": score, "validation": score, "test": score}

    runs = [{"seed": seed, "fp32_peak": 1e11, "summary": summary(total, right)}
            for seed, total, right in ((0, 600, 9), (1, 900, 5), (2, 660, 7))]
    report = {"started": "now", "machine": "test", "threads": 2, "jobs": 1, "fast": False, "fp32_peak_after": 1e11,
              "runs": runs}
    (tmp_path / "seeds.json").write_text(json.dumps(report))
    assert quickstart_seeds.main(["--output", str(tmp_path), "--summarize-only"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("|")}
    # total minutes 10.0 / 11.0 / 15.0; test colour+shape 50% / 70% / 90%
    assert "| 10.0 |" in rows["**min**"] and "| 50% |" in rows["**min**"]
    assert "| 11.0 |" in rows["**median**"] and "| 70% |" in rows["**median**"]
    assert "| 15.0 |" in rows["**max**"] and "| 90% |" in rows["**max**"]
    assert "VQA accuracy" not in rows  # runs from before the quickstart reported through `minigpt4 eval`


def test_cache_recipe_multiplies_measured_costs_out_to_the_stage2_recipe(tmp_path, capsys):
    """1000 steps of 12 from batch-2 step times; the cache build = the towers' cost per image and view (the step
    difference) + the fixed rest of a measured build; break-even passes."""
    from benchmarks import cache_recipe

    def row(variant: str, times: list[float], **extra) -> dict:
        return {"variant": variant, "step_times": times, "spec": {"batch": 2}, **extra}

    report = {"machine": "test", "parts": {"stage2": [
        row("original", [1.0, 2.0, 3.0]), row("ours", [1.5, 1.5, 1.5]),
        row("ours+cache", [0.5, 0.5, 0.5], cache_build_times=[2.0, 3.0, 9.0], cache_images=2),
    ]}}
    (tmp_path / "train.json").write_text(json.dumps(report))
    output = tmp_path / "computed.json"
    assert cache_recipe.main(["computed", "--train-json", str(tmp_path / "train.json"), "--views", "4",
                              "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["encode_s_per_image"] == pytest.approx(0.5)  # (1.5 - 0.5) / 2
    assert result["build_fixed_s"] == pytest.approx(2.0)  # median build 3.0 - 2 images x 0.5
    variants = result["variants"]
    assert variants["original"]["total_s"][1] == pytest.approx(1000 * 2.0 * 6)  # median step, batch 2 -> 12
    one_view = variants["ours+cache, 1 view (data.augment=false)"]
    assert one_view["build_s"] == pytest.approx(2.0 + 3500 * 0.5)
    assert one_view["total_s"][1] == pytest.approx(1752 + 1000 * 0.5 * 6)
    assert one_view["speedup"] == pytest.approx(12000 / 4752)
    assert variants["ours+cache, 4 views (data.augment=true, as the recipe)"]["build_s"] == pytest.approx(7002)
    assert result["breakeven_passes"] == {"1": pytest.approx(1 + 2 / 1750), "4": pytest.approx(4 + 2 / 1750)}
    assert "COMPUTED" in capsys.readouterr().out


def test_quickstart_stage2_trials_table_shows_each_trial_on_validation(tmp_path, capsys, monkeypatch):
    """`benchmarks.quickstart_stage2 summarize` prints one row per trial folder, from the records it wrote."""
    from benchmarks import quickstart_stage2

    records = json.loads((Path(quickstart_stage2.__file__).parent / "results" /
                          "quickstart-stage2-trials.json").read_text())
    for record in records:
        (tmp_path / record["trial"]).mkdir()
        (tmp_path / record["trial"] / "summary.json").write_text(json.dumps(record))
    monkeypatch.setattr("sys.argv", ["quickstart_stage2", "summarize", "--output", str(tmp_path)])
    quickstart_stage2.main()
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 + len(records) and rows[0].startswith("| trial |")
    base = next(row for row in rows if row.startswith("| base |"))
    # Seed 0's validation split, trial "base": 35% right descriptions, VQA 59.7%, POPE all "yes" (50%, 100%).
    assert "| 35% | 59.7 (28 / 95 / 85 / 26) | 50, 100% / 50, 100% / 50, 100% | 1.40 |" in base
