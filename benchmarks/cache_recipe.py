"""The frozen-feature cache end to end: the stage-2 recipe with and without it, cache building included.

    # Computed at full dims from a `benchmarks.run --dims original` JSON (a real whole run is ~a day here):
    python -m benchmarks.cache_recipe computed --train-json benchmarks/results/stage2-cpu.json
    # Real whole runs of a reduced recipe at the embedded (quickstart) scale, on a finished quickstart folder:
    python -m benchmarks.cache_recipe real --quickstart quickstart

The recipe is the original's stage 2: 5 epochs x 200 steps of 12 over the 3,500 cc_sbu_align images (3.43
passes), with its random resized crops. "computed" multiplies measured per-step and per-image costs
out to the recipe: the batch-2 step times of the benchmark JSON scaled per sample to batch 12, the cache
build per image from the same JSON, and the break-even point of the cache in passes over the data.

"real" validates that arithmetic at a scale that runs in minutes: the reduced recipe (by default 5 x 20
steps of 12 over 350 images, the same 3.43 passes) on the quickstart's stage-1 model and image-description
pairs drawn as the quickstart's stage 2 drew them before it became an instruction set (the same seeds, images
and descriptions; `stage2_descriptions`), with one prompt (data.augment=true, as the original), once without the
cache (fresh random crops every pass) and once with a one-view cache (each image's crop drawn once, built inside
the timed run). Before the whole runs it measures the per-step costs (short runs, every step logged) and the
per-image cache cost (a small cache built 3 times), predicts both whole runs, then runs them and prints predicted
vs real.
Both trained models are scored on held-out images (the eval transform): what a one-view cache, i.e.
frozen crops, does to the validation loss against fresh crops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peak import matmul_peak
from benchmarks.run import RESULTS_DIR, lscpu_model

RECIPE = {"epochs": 5, "steps_per_epoch": 200, "batch": 12, "images": 3500}


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------ computed (full dims)


def computed(args: argparse.Namespace) -> dict:
    """The recipe's whole-run time per variant from a benchmark JSON's stage-2 rows (median, min-max).

    Building the cache runs the same frozen towers per image as an uncached step does, so its cost per image
    is the step difference (ours - ours+cache, per sample), and the rest of a measured build (of `batch`
    images) is its fixed cost (the fingerprint of the frozen weights, opening the data).
    """
    report = json.loads(args.train_json.read_text())
    rows = {r["variant"]: r for r in report["parts"]["stage2"]}
    for needed in ("original", "ours", "ours+cache"):
        if needed not in rows:
            raise SystemExit(f"error: {args.train_json} has no stage2 {needed!r} row: run benchmarks.run with it")
    cached = rows["ours+cache"]
    batch = cached["spec"]["batch"]
    steps = RECIPE["epochs"] * RECIPE["steps_per_epoch"]
    passes = steps * RECIPE["batch"] / RECIPE["images"]
    scale = RECIPE["batch"] / batch  # per-sample scaling of a batch-`batch` step to the recipe's batch 12
    per_image = (statistics.median(rows["ours"]["step_times"]) - statistics.median(cached["step_times"])) / batch
    fixed = statistics.median(cached["cache_build_times"]) - batch * per_image
    out: dict = {"source": str(args.train_json), "machine": report["machine"], "recipe": RECIPE,
                 "measured_batch": batch, "encode_s_per_image": per_image, "build_fixed_s": fixed, "variants": {}}
    lines = [f"Stage-2 recipe ({RECIPE['epochs']} x {RECIPE['steps_per_epoch']} steps of {RECIPE['batch']} over "
             f"{RECIPE['images']} images = {passes:.2f} passes), COMPUTED from measured costs (a real whole run is "
             f"about a day on this CPU): the batch-{batch} steps of `{args.train_json.name}` "
             f"({len(cached['step_times'])} timed per variant) scaled per sample to batch {RECIPE['batch']}; the "
             f"cache costs the towers' {per_image:.2f} s per image and view (ours minus ours+cache per sample) plus "
             f"{fixed:.1f} s once (the rest of a measured {batch}-image build: fingerprinting the frozen weights). "
             f"{report['machine']}.",
             "", "| variant | s/step at batch 12, median (min-max) | cache build | whole run, median (min-max) | "
             "× original |", "|---|---|---|---|---|"]
    variants = [(name, name, 0) for name in ("original", "transformers", "ours") if name in rows]
    variants += [("ours+cache, 1 view (data.augment=false)", "ours+cache", 1),
                 (f"ours+cache, {args.views} views (data.augment=true, as the recipe)", "ours+cache", args.views)]
    base = None
    for label, name, views in variants:
        low, mid, high = (t * scale for t in spread(rows[name]["step_times"]))
        build = fixed + per_image * RECIPE["images"] * views if views else 0.0
        total = (build + steps * low, build + steps * mid, build + steps * high)
        base = base or total[1]
        out["variants"][label] = {"step_s": (low, mid, high), "build_s": build, "total_s": total,
                                  "speedup": base / total[1]}
        build_cell = f"{hours(build)} ({views} x {RECIPE['images']} images)" if views else "-"
        lines.append(f"| {label} | {mid:.1f} ({low:.1f}-{high:.1f}) | {build_cell} | {hours(total[1])} "
                     f"({hours(total[0])}-{hours(total[2])}) | {base / total[1]:.2f} |")
    # Break-even: a cache of V views costs V encodes per image (+ the fixed part) and saves one per image per pass.
    out["breakeven_passes"] = {v: v + fixed / (RECIPE["images"] * per_image) for v in (1, args.views)}
    lines += ["", f"Break-even: a 1-view cache pays for itself after "
              f"{out['breakeven_passes'][1]:.2f} passes over the data, a {args.views}-view one (needed for random "
              f"crops) after {out['breakeven_passes'][args.views]:.2f}; the recipe makes {passes:.2f}.", ""]
    print("\n".join(lines))
    return out


# ------------------------------------------------------------------------------------ real (embedded scale)


PROMPT_LINE = "<Img><ImageHere></Img> Describe this image."


def stage2_descriptions(dest: Path, count: int, seed: int) -> Path:
    """A cc_sbu_align folder of `count` drawn shapes with their descriptions: the quickstart's stage-2 images of
    `seed` (its stage-2 seed range) as its stage 2 drew and described them before its instruction set."""
    from minigpt4.data.synthetic import SPLIT_SEED_OFFSETS, draw_scene, write_stage2

    first = seed * 10_000_000 + SPLIT_SEED_OFFSETS["stage2"]
    items = []
    for i in range(count):
        image, scene = draw_scene(first + i)
        items.append((f"shape{i}", image, scene.description()))
    write_stage2(dest, items)
    return dest


def subset(source: Path, dest: Path, first: int, count: int, crop_seed: int | None = None, size: int = 224) -> Path:
    """A cc_sbu_align folder of annotations [first, first + count) of `source`, images copied.

    With `crop_seed`, each image is replaced by ONE random resized crop of it (the training transform's crop,
    drawn once): training on that folder without augmentation is training on a one-view cache's frozen crops.
    """
    from PIL import Image

    from minigpt4.processing.image import train_transform

    annotations = json.loads((source / "filter_cap.json").read_text())["annotations"][first:first + count]
    if len(annotations) < count:
        raise SystemExit(f"error: {source} holds {first + len(annotations)} annotations, {first + count} needed")
    (dest / "image").mkdir(parents=True)
    crop = train_transform(size).transforms[1]  # RandomResizedCrop, as the training transform draws it
    for item in annotations:
        name = f"{item['image_id']}.jpg"
        if crop_seed is None:
            shutil.copyfile(source / "image" / name, dest / "image" / name)
            continue
        torch.manual_seed(hash((crop_seed, item["image_id"])) % 2**31)
        with Image.open(source / "image" / name) as image:
            crop(image.convert("RGB")).save(dest / "image" / name, quality=95)
    (dest / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return dest


def job(args: argparse.Namespace, data: Path, out: Path, steps: int, epochs: int, cache: Path | None,
        log_every: int, augment: bool = True):
    from minigpt4.config import train_config

    overrides = {
        "preset": "embedded", "model.device": "cpu",
        "model.weights.pretrained": str(args.quickstart / "stage1" / "model"),
        "data.datasets": json.dumps([{"kind": "aligned", "path": str(data)}]),
        "data.batch_size": args.batch, "data.num_workers": 0, "data.augment": str(augment).lower(),
        "data.prompts": str(data.parent / "prompts.txt"),  # `real` writes it beside its data folders
        "data.prompt_template": "'###Human: {} ###Assistant: '", "data.end_sym": "'###'", "data.max_txt_len": 48,
        "data.process_captions": "false", "data.feature_cache": str(cache) if cache else "''",
        "train.lr": 1e-3, "train.min_lr": 3e-4, "train.warmup_lr": 1e-5, "train.warmup_steps": max(1, steps // 30),
        "train.schedule": "continuous", "train.epochs": epochs, "train.iters_per_epoch": steps // epochs,
        "train.weight_decay": 0.01, "train.precision": "fp32", "train.seed": args.seed, "train.log_every": log_every,
        "train.keep_last": 1, "train.tensorboard": "false", "train.resume": "''", "train.output_dir": str(out),
    }
    return train_config(None, [f"{k}={v}" for k, v in overrides.items()])


def logged_step_times(out: Path, batch: int) -> list[float]:
    """Seconds per step from a run logged every step (the first step, which pays for lazy setup, left out)."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [batch / r["samples_per_s"] for r in records[1:]]


def build(cfg, data: Path, cache: Path, views: int) -> float:
    """Build the `views`-view cache of `data` with the job's model and transform; returns the seconds."""
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_job_model

    start = time.perf_counter()
    model = build_job_model(cfg)
    build_cache(model, [("aligned", str(data))], cache, data_transform(cfg), views=views,
                batch_size=cfg.data.batch_size, process_captions=False, seed=cfg.train.seed)
    return time.perf_counter() - start


def validation_loss(cfg, checkpoint: Path, data: Path, prompt: str) -> float:
    """Mean target-token loss of the trained model on `data` (eval transform: the whole image, no crop)."""
    from minigpt4.data.aligned import stage2_batches
    from minigpt4.model.build import build_job_model
    from minigpt4.processing.image import eval_transform
    from minigpt4.processing.prompt import layout_batch
    from minigpt4.train.checkpoint import load_checkpoint, load_trainable_state_dict
    from minigpt4.train.loop import target_count

    model = build_job_model(cfg)
    load_trainable_state_dict(model, load_checkpoint(checkpoint)["model"], str(checkpoint))
    model.eval()
    total, count = 0.0, 0
    images = len(json.loads((data / "filter_cap.json").read_text())["annotations"])
    batches = stage2_batches(str(data), eval_transform(cfg.model.vision.image_size), cfg.data.batch_size, seed=0)
    with torch.no_grad():
        for _ in range(images // cfg.data.batch_size):
            batch = next(batches)
            layout = layout_batch(model.tokenizer, batch["text"], model.num_image_tokens, prompt, cfg.data.end_sym,
                                  cfg.data.max_txt_len)
            embeds = model.embed(layout, model.encode_images(batch["image"]))
            tokens = int(target_count(layout))
            total += float(model.lm_loss(embeds, layout.attention_mask, layout.labels)) * tokens
            count += tokens
    return total / count


def real(args: argparse.Namespace) -> dict:
    from minigpt4.train.loop import train

    steps, epochs, views = args.epochs * args.steps_per_epoch, args.epochs, args.views
    work = Path(tempfile.mkdtemp(prefix="cache-recipe-"))
    (work / "prompts.txt").write_text(PROMPT_LINE + "\n")
    seed = json.loads((args.quickstart / "summary.json").read_text())["seed"]
    source = stage2_descriptions(work / "stage2", args.images + args.validation_images, seed)
    data = subset(source, work / "train", 0, args.images)
    frozen_data = subset(source, work / "train-frozen-crops", 0, args.images, crop_seed=args.seed)
    held_out = subset(source, work / "validation", args.images, args.validation_images)
    prompt = f"###Human: {PROMPT_LINE} ###Assistant: "

    # 1. Costs: a step without and with the cache (short runs, every step logged) and the cache's cost per
    #    stored view (a small cache built 3 times); the whole runs are predicted from them.
    probe = subset(source, work / "probe", 0, args.batch)
    probe_cfg = job(args, probe, work / "probe-uncached", args.short_steps, 1, None, 1)
    per_view = [build(probe_cfg, probe, work / f"probe-cache{i}", views) / (args.batch * views) for i in range(3)]
    train(probe_cfg)
    uncached_steps = logged_step_times(work / "probe-uncached", args.batch)
    train(job(args, probe, work / "probe-cached", args.short_steps, 1, work / "probe-cache0", 1))
    cached_steps = logged_step_times(work / "probe-cached", args.batch)
    step_u, step_c, view_s = (statistics.median(x) for x in (uncached_steps, cached_steps, per_view))
    predicted = {"uncached": steps * step_u, "cached": args.images * views * view_s + steps * step_c,
                 "one_view": args.images * view_s + steps * step_c}

    # 2. The whole runs, timed end to end (model building, data reading, cache building, checkpoints included).
    real_s: dict[str, float] = {}
    start = time.perf_counter()
    fresh = train(job(args, data, work / "fresh", steps, epochs, None, args.steps_per_epoch))
    real_s["uncached"] = time.perf_counter() - start
    cfg_cached = job(args, data, work / "cached", steps, epochs, work / "cache", args.steps_per_epoch)
    start = time.perf_counter()
    real_s["cached_build"] = build(cfg_cached, data, work / "cache", views)
    multi = train(cfg_cached)
    real_s["cached"] = time.perf_counter() - start
    cfg_one = job(args, frozen_data, work / "one-view", steps, epochs, work / "cache1", args.steps_per_epoch,
                  augment=False)
    start = time.perf_counter()
    real_s["one_view_build"] = build(cfg_one, frozen_data, work / "cache1", 1)
    one = train(cfg_one)
    real_s["one_view"] = time.perf_counter() - start

    # 3. What the crops the model saw do to the loss on held-out images (whole images, eval transform).
    val = {name: validation_loss(cfg_cached, result.checkpoint, held_out, prompt)
           for name, result in (("fresh", fresh), ("cached", multi), ("one_view", one))}
    shutil.rmtree(work, ignore_errors=True)

    passes = steps * args.batch / args.images
    result = {
        "recipe": {"epochs": epochs, "steps_per_epoch": args.steps_per_epoch, "batch": args.batch,
                   "images": args.images, "passes": passes, "views": views,
                   "validation_images": args.validation_images},
        "per_view_build_s": per_view, "uncached_step_s": uncached_steps, "cached_step_s": cached_steps,
        "predicted_s": predicted, "real_s": real_s,
        "final_train_loss": {"fresh": fresh.final_loss, "cached": multi.final_loss, "one_view": one.final_loss},
        "validation_loss": val,
    }

    def cost(values: list[float], digits: int = 2) -> str:
        lo, mid, hi = spread(values)
        return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

    print(f"Reduced stage-2 recipe, REAL whole runs (1 each) at the embedded (quickstart) scale: {epochs} x "
          f"{args.steps_per_epoch} steps of {args.batch} over {args.images} images ({passes:.2f} passes, as the "
          f"original's 5 x 200 x 12 over 3,500), data.augment=true; EfficientNet-Lite0 + trainable Q-Former + "
          f"SmolLM2-135M, {torch.get_num_threads()} threads. Predicted = measured costs multiplied out: "
          f"step without the cache {cost(uncached_steps)} s, with it {cost(cached_steps)} s ({len(uncached_steps)} "
          f"steps each, median (min-max)); cache build {cost(per_view, 3)} s per stored view (3 builds).\n")
    print("| run | predicted | real whole run | real / predicted | held-out loss |\n|---|---|---|---|---|")
    rows = (("without the cache: fresh random crops every pass", "uncached", "fresh", None),
            (f"{views}-view cache (one of {views} stored crops per pass), build included", "cached", "cached",
             "cached_build"),
            ("one-view cache of frozen crops (one crop per image, every pass), build included", "one_view",
             "one_view", "one_view_build"))
    for label, key, loss_key, build_key in rows:
        built = f" (build {real_s[build_key]:.0f} s)" if build_key else ""
        print(f"| {label} | {predicted[key]:.0f} s | {real_s[key]:.0f} s{built} | "
              f"{real_s[key] / predicted[key]:.2f} | {val[loss_key]:.4f} |")
    print(f"\nCache speed-up end to end: {views}-view {real_s['uncached'] / real_s['cached']:.2f}x real "
          f"({predicted['uncached'] / predicted['cached']:.2f}x predicted); one-view "
          f"{real_s['uncached'] / real_s['one_view']:.2f}x real ({predicted['uncached'] / predicted['one_view']:.2f}x "
          f"predicted). Held-out loss on {args.validation_images} images after the same {steps} steps: frozen crops "
          f"{100 * (val['one_view'] - val['fresh']) / val['fresh']:+.1f}% vs fresh crops, {views}-view cache "
          f"{100 * (val['cached'] - val['fresh']) / val['fresh']:+.1f}%.\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_recipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    comp = sub.add_parser("computed", help="the full recipe at full dims, from a benchmarks.run JSON")
    comp.add_argument("--train-json", type=Path, default=RESULTS_DIR / "stage2-cpu.json")
    comp.add_argument("--views", type=int, default=4, help="stored crops per image of the augmented cache")
    rl = sub.add_parser("real", help="real whole runs of a reduced recipe at the embedded scale")
    rl.add_argument("--quickstart", type=Path, default=Path("quickstart"),
                    help="a finished `minigpt4 quickstart` folder (its stage-1 model and seed)")
    rl.add_argument("--images", type=int, default=350)
    rl.add_argument("--validation-images", type=int, default=144)
    rl.add_argument("--epochs", type=int, default=5)
    rl.add_argument("--steps-per-epoch", type=int, default=20)
    rl.add_argument("--batch", type=int, default=12)
    rl.add_argument("--short-steps", type=int, default=6, help="steps of the short runs that measure a step")
    rl.add_argument("--views", type=int, default=4, help="stored crops per image of the augmented cache")
    rl.add_argument("--seed", type=int, default=0)
    for p in (comp, rl):
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--output", type=Path, default=None, help="JSON (default benchmarks/results/cache-<mode>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = f"{lscpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    peak = matmul_peak(torch.float32)
    print(f"# Feature cache, {args.mode}\n\n{machine}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s. "
          f"Started {started}; load average {os.getloadavg()[0]:.1f} (a shared 2-core machine).\n")
    result = computed(args) if args.mode == "computed" else real(args)
    result.update(started=started, machine=machine, fp32_peak_flops=peak, load_average_at_end=os.getloadavg())
    output = args.output or RESULTS_DIR / f"cache-{args.mode}.json"
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
