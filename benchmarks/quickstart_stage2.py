"""How the quickstart's stage-2 settings were chosen: trials scored on the VALIDATION split only.

    python -m benchmarks.quickstart_stage2 trials --quickstart DIR --output OUT [--trial NAME ...] [--threads N]
    python -m benchmarks.quickstart_stage2 summarize --output OUT      # re-print the table from OUT/*/summary.json
    python -m benchmarks.quickstart_stage2 text-probe [--probes N]

`trials` trains stage 2 again from a finished quickstart's stage-1 model (DIR/stage1/model, the run's own stage-2
job DIR/stage2.yaml with the trial's changes), then scores it on DIR/data/validation: the quickstart's own colour +
shape score of the descriptions, `minigpt4 eval` (captioning, VQAv2 accuracy, POPE per sampling setting) and the
VQA accuracy per question kind. A trial that changes the instruction mix (`probe_weight`) draws the run's data
again with that mix (same seed: same images) and caches its features. The test splits take no part.

`text-probe` asks the frozen LLM alone (SmolLM2-135M-Instruct) POPE's question with the object that *is* shown
written out as text where the image goes ("<Img>a blue square</Img> Is there a red circle in the image?"), with no
examples and with four worked examples before it. It is the most a frozen LLM can be handed: a model whose only
trainable part writes what the LLM reads cannot do better at telling a present object from an absent one than the
LLM can from the words themselves.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml


@dataclass(frozen=True)
class Trial:
    """One stage-2 setting: what differs from the quickstart's stage-2 job."""

    lr: float = 1e-3
    min_lr: float = 3e-4
    steps: int = 240
    qformer_trainable: bool = True
    probe_weight: float = 1.0  # the yes/no probe's share of the instruction mix, relative to each other kind


TRIALS: dict[str, Trial] = {
    "base": Trial(),  # the plan as first written (the description-only stage 2's settings)
    "frozen_qformer": Trial(qformer_trainable=False),  # MiniGPT-4's own stage 2: the projection alone
    "no_probes": Trial(probe_weight=0.0),  # the instruction mix without the yes/no probes
    "lr_2e-3": Trial(lr=2e-3, min_lr=6e-4),
    "lr_4e-3": Trial(lr=4e-3, min_lr=1.2e-3),
    "steps_400": Trial(steps=400),  # what the 20-minute budget leaves room for (~4 more minutes here)
}


def run_trial(name: str, trial: Trial, quickstart: Path, seed: int, out: Path, threads: int) -> dict:
    """Stage 2 of `trial` from the quickstart's stage-1 model, then its validation scores (written to
    out/summary.json and returned)."""
    from minigpt4.commands.quickstart import EVAL_PROMPT, FULL, evaluate_with_eval_command, export
    from minigpt4.config import train_config
    from minigpt4.data import synthetic
    from minigpt4.eval_shapes import evaluate_split
    from minigpt4.feature_cache import build_cache, data_transform
    from minigpt4.model.build import build_job_model
    from minigpt4.model.minigpt4 import MiniGPT4
    from minigpt4.train.loop import train

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = yaml.safe_load((quickstart / "stage2.yaml").read_text())
    job["train"].update(lr=trial.lr, min_lr=trial.min_lr, iters_per_epoch=trial.steps,
                        warmup_steps=max(1, trial.steps // 30), output_dir=str(out / "stage2"))
    job["model"]["qformer"] = {"trainable": trial.qformer_trainable}
    start = time.perf_counter()
    if trial.probe_weight != synthetic.PROBE_WEIGHT:
        data = synthetic.generate(out / "data", FULL.stage1_images, FULL.stage2_images, 0, 0, 0, seed=seed,
                                  probe_weight=trial.probe_weight)
        job["data"]["datasets"] = [{"kind": "conversations", "path": str(data.stage2), "ratio": 1.0}]
        job["data"]["feature_cache"] = str(out / "cache")
    (out / "stage2.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    cfg = train_config(out / "stage2.yaml")
    if trial.probe_weight != synthetic.PROBE_WEIGHT:
        model = build_job_model(cfg)
        build_cache(model, [("conversations", str(data.stage2))], out / "cache", data_transform(cfg),
                    process_captions=False)
        del model
    result = train(cfg)
    final = export(cfg, result.checkpoint, out / "model")
    trained = time.perf_counter() - start

    root = quickstart / "data" / "validation"
    validation = synthetic.EvalSplit(
        "validation", root, root / "validation.json", root / "captions_validation.json",
        root / "questions_validation.json", root / "annotations_validation.json",
        {s: root / f"pope_validation_{s}.jsonl" for s in synthetic.POPE_SETTINGS},
        len(json.loads((root / "validation.json").read_text())))
    described = evaluate_split(MiniGPT4.from_pretrained(final), validation.scenes, prompt=EVAL_PROMPT)
    metrics = evaluate_with_eval_command(final, validation, out / "eval")
    summary = {"trial": name, "settings": asdict(trial), "seed": seed, "final_loss": result.final_loss,
               "train_seconds": round(trained, 1), "describe": described.summary(),
               "describe_accuracy": described.accuracy,
               "vqa_per_kind": vqa_per_kind(out / "eval" / "vqav2" / "predictions.jsonl", validation.vqa_annotations),
               "metrics": metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def vqa_per_kind(predictions: Path, annotations: Path) -> dict[str, float]:
    """Exact-match accuracy of the VQA predictions per question kind (colour, shape, count, position)."""
    kinds = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    right: dict[str, list[bool]] = collections.defaultdict(list)
    for line in predictions.read_text().splitlines():
        record = json.loads(line)
        truth = kinds[int(record["id"])]
        right[truth["question_type"]].append(record["prediction"].strip().lower() == truth["multiple_choice_answer"])
    return {kind: sum(hits) / len(hits) for kind, hits in right.items()}


def table(summaries: list[dict]) -> str:
    """The trials side by side (validation split)."""
    head = ("| trial | settings | stage-2 loss | descriptions colour+shape | VQA acc (colour / shape / count / "
            "position) | POPE acc, yes-ratio (random / popular / adversarial) | CIDEr | train s |")
    lines = [head, "|" + "---|" * 8]
    for s in summaries:
        m, kinds = s["metrics"], s["vqa_per_kind"]
        pope = " / ".join(f"{100 * m[f'pope_{k}']['accuracy']:.0f}, {100 * m[f'pope_{k}']['yes_ratio']:.0f}%"
                          for k in ("random", "popular", "adversarial"))
        per = " / ".join(f"{100 * kinds.get(k, float('nan')):.0f}" for k in ("colour", "shape", "count", "position"))
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items())
        cider = f"{m['caption']['CIDEr']:.2f}" if "caption" in m else "-"
        lines.append(f"| {s['trial']} | {settings} | {s['final_loss']:.3f} | {100 * s['describe_accuracy']:.0f}% | "
                     f"{100 * m['vqav2']['accuracy']:.1f} ({per}) | {pope} | {cider} | {s['train_seconds']:.0f} |")
    return "\n".join(lines)


def text_probe(probes: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """POPE-style probes answered by the frozen LLM from the shown object written as text (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpt4.commands.quickstart import STAGE2_TEMPLATE
    from minigpt4.data.synthetic import (
        COLOURS, SHAPES, SHORT_ANSWER_SUFFIX, Scene, absent_object, article, object_name, pope_question)
    from minigpt4.embedded import prepare_smollm2

    folder = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = AutoModelForCausalLM.from_pretrained(folder).eval()
    yes = [tokenizer.encode(w)[0] for w in ("yes", "Yes")]
    no = [tokenizer.encode(w)[0] for w in ("no", "No")]

    def turn(shown: str, asked: str) -> str:
        return STAGE2_TEMPLATE.format(f"<Img>{article(shown)}</Img> {pope_question(asked)}{SHORT_ANSWER_SUFFIX}")

    examples = [("green star", "green star", "yes"), ("blue circle", "red circle", "no"),
                ("purple cross", "purple diamond", "no"), ("orange square", "orange square", "yes")]
    shots = "".join(turn(shown, asked) + answer + "###" for shown, asked, answer in examples)
    rng = random.Random(seed)
    results = {}
    for name, prefix in (("zero-shot", ""), ("4 examples", shots)):
        right = said_yes = 0
        for i in range(probes):
            scene = Scene(rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), 1, "centre", "white", 0)
            present = i % 2 == 0  # balanced, as POPE's files are
            shown = object_name(scene.colour, scene.shape)
            asked = shown if present else absent_object(scene, rng.choice(("random", "adversarial")), rng, [])
            ids = tokenizer(prefix + turn(shown, asked), return_tensors="pt").input_ids
            with torch.no_grad():
                logits = llm(ids).logits[0, -1]
            answer_yes = bool(logits[yes].max() > logits[no].max())
            right += answer_yes == present
            said_yes += answer_yes
        results[name] = {"accuracy": right / probes, "yes_ratio": said_yes / probes, "probes": probes}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    trials = sub.add_parser("trials", help="train and score stage-2 trials on a quickstart's validation split")
    trials.add_argument("--quickstart", type=Path, required=True, help="a finished `minigpt4 quickstart` folder")
    trials.add_argument("--output", type=Path, required=True)
    trials.add_argument("--trial", nargs="+", choices=tuple(TRIALS), default=list(TRIALS))
    trials.add_argument("--seed", type=int, default=0, help="the quickstart's --seed (its data are drawn again "
                        "from it for a trial with another instruction mix)")
    trials.add_argument("--threads", type=int, default=2)
    summarize = sub.add_parser("summarize", help="print the table of the trials under --output")
    summarize.add_argument("--output", type=Path, required=True)
    probe = sub.add_parser("text-probe", help="POPE probes answered by the frozen LLM from text")
    probe.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()

    if args.command == "text-probe":
        print(json.dumps(text_probe(args.probes), indent=1))
        return
    if args.command == "trials":
        for name in args.trial:
            run_trial(name, TRIALS[name], args.quickstart.resolve(), args.seed, args.output.resolve() / name,
                      args.threads)
    summaries = [json.loads(p.read_text()) for p in sorted(args.output.glob("*/summary.json"))]
    print(table(summaries))


if __name__ == "__main__":
    main()
