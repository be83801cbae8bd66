"""`minigpt4 eval TASK`: answer a benchmark's questions (or caption its images) in batches, greedily, and score.

Predictions stream to OUTPUT/predictions.jsonl as each batch ends, so a run that stops (killed, out of
time) resumes where it was: a rerun skips the samples already there. OUTPUT/run.json records what the
predictions were made with, and a rerun with other settings is refused rather than mixing them. The
scores, with the model, settings, seed, sample list and metric versions, go to OUTPUT/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from minigpt4.commands import CommandError
from minigpt4.commands.model_options import (
    OVERRIDE,
    add_generation_arguments,
    add_model_arguments,
    generation_settings,
    load_model,
)
from minigpt4.commands.paths import check_output_folder
from minigpt4.eval.tasks import QUESTION, TASKS, Sample

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN = "run.json"
RESULTS = "results.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=list(TASKS), help="; ".join(f"{name}: {task.files}"
                                                                   for name, task in TASKS.items()))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="section.key=value model config overrides (right after TASK)")
    parser.add_argument("--questions", type=Path, help="the task's question file")
    parser.add_argument("--annotations", type=Path, help="the task's annotation (answers or captions) file")
    parser.add_argument("--images", type=Path, help="the folder the task's images are in")
    parser.add_argument("--split", default="test", help="the split kept from a Karpathy dataset_*.json (default test)")
    parser.add_argument("--prompt", default=None,
                        help="what is asked for each sample; {question} stands for the question (default: "
                        f"{TASKS['vqav2'].prompt!r} for questions, {TASKS['caption'].prompt!r} for captioning)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"the folder for {PREDICTIONS}, {RUN} and {RESULTS} (default eval/TASK); samples "
                        "already predicted there are skipped")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser)
    add_generation_arguments(parser, greedy_default=True)


# ------------------------------------------------------------------------------------ predictions file


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> record of the predictions already in `path`.

    An interrupted run can leave a last line without its newline (cut off, or whole): a cut-off line is
    dropped, and the file is rewritten so that the next record starts on a line of its own. Any other bad
    line is an error (the file is not ours to guess about).
    """
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["id"])] = {**record, "prediction": str(record["prediction"])}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if number < len(lines):  # a line with its newline: not an interruption's doing
                raise CommandError(f"{path} line {number} is not a prediction record ({err}); delete or fix "
                                   "it") from None
            log.warning("%s: dropping its last line, cut off by an interrupted run", path)
    if text and not text.endswith("\n"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()), encoding="utf-8")
    return records


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


# ------------------------------------------------------------------------------------ the run


def _model_record(args: argparse.Namespace) -> dict:
    return {"preset": args.preset, "config": str(args.config) if args.config else None,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None, "overrides": list(args.overrides)}


def _check_run_record(path: Path, record: dict) -> None:
    """Write `record` (what the predictions are made with), or check it matches the one already there."""
    if path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CommandError(f"{path} is not JSON ({err}); delete it with {PREDICTIONS} to start over") from None
        changed = sorted(key for key in set(before) | set(record) if before.get(key) != record.get(key))
        if changed:
            raise CommandError(f"{path.parent} holds predictions made with other {', '.join(changed)} "
                               f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); give another --output "
                               "or delete that folder")
    else:
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from minigpt4.chat.generation import generate
    from minigpt4.chat.templates import Message, get_template
    from minigpt4.eval.metrics import METRIC_VERSIONS
    from minigpt4.eval.tasks import TaskFileError, read_task, score
    from minigpt4.processing.image import ImageError, eval_transform, load_image

    task = TASKS[args.task]
    bad = [item for item in args.overrides if not OVERRIDE.match(item)]
    if bad:
        raise CommandError(f"{bad[0]!r} is not a section.key=value override; the task's files go in --questions, "
                           "--annotations and --images")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be at least 1, got {args.limit}")
    prompt = args.prompt if args.prompt is not None else task.prompt
    if task.asks_questions and QUESTION not in prompt:
        raise CommandError(f"--prompt {prompt!r} has no {QUESTION}: say where the question goes, e.g. "
                           f"{task.prompt!r}")
    # Greedy, short answers unless asked otherwise: the model's chat defaults (sampling, 300 tokens) are for chat.
    if args.do_sample is None:
        args.do_sample = False
    if args.max_new_tokens is None:
        args.max_new_tokens = task.max_new_tokens
    generation_settings(args)  # bad decoding flags fail before the files are read or the model loads
    if args.task == "caption" and shutil.which("java") is None:
        raise CommandError("eval caption needs Java on PATH (pycocoevalcap's PTB tokenizer and METEOR run on it); "
                           "install a Java runtime, e.g. `apt-get install default-jre-headless`")
    output = args.output or Path("eval") / args.task
    check_output_folder(output, "--output")
    try:
        samples = read_task(args.task, args.questions, args.annotations, args.images, args.split)
    except TaskFileError as err:
        raise CommandError(str(err)) from None
    samples = samples[: args.limit] if args.limit else samples
    if not samples:
        raise CommandError(f"eval {args.task}: the files hold no samples")
    flags = {name: getattr(args, name) for name in ("do_sample", "max_new_tokens", "temperature", "top_p", "top_k",
                                                    "num_beams", "repetition_penalty", "max_context", "stop",
                                                    "seed", "template", "system")}
    run_record = {"task": args.task, "prompt": prompt, "model": _model_record(args), "flags": flags}
    output.mkdir(parents=True, exist_ok=True)
    _check_run_record(output / RUN, run_record)
    predictions_path = output / PREDICTIONS
    done = read_predictions(predictions_path)
    pending = [sample for sample in samples if sample.id not in done]
    already = len(samples) - len(pending)

    model = load_model(args, args.overrides)
    talk = model.chat_defaults
    settings = generation_settings(args, talk.generation)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    template = get_template(talk.template, model.tokenizer)
    transform = eval_transform(model.config.vision.image_size)
    skipped: list[str] = []
    with predictions_path.open("a", encoding="utf-8") as out, \
            tqdm(total=len(pending), desc=f"eval {args.task}", unit="sample", file=sys.stderr) as bar:
        for batch in _batches(pending, args.batch_size):
            good, pixels = [], []
            for sample in batch:
                try:
                    pixels.append(transform(load_image(sample.image, name=f"{sample.image} (sample {sample.id})")))
                    good.append(sample)
                except (ImageError, FileNotFoundError) as err:
                    skipped.append(str(err))
            if good:
                prompts = [template.render([Message("user", prompt.replace(QUESTION, s.question or ""), images=1)],
                                           talk.system) for s in good]
                completions = generate(model, prompts, [[p] for p in pixels], settings,
                                       template_stops=template.stop, add_bos=template.add_bos)
                for sample, completion in zip(good, completions, strict=True):
                    record = {"id": sample.id, "prediction": completion.text.strip(),
                              "finish_reason": completion.finish_reason}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    done[sample.id] = record
                out.flush()  # a crash loses at most the batch in flight
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped))
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)

    scored = [sample for sample in samples if sample.id in done]
    try:
        metrics = score(args.task, scored, {sample.id: done[sample.id]["prediction"] for sample in scored})
    except ValueError as err:  # references the metric cannot use (a POPE label that is not yes/no, ...)
        raise CommandError(f"eval {args.task}: {err}; predictions are kept in {predictions_path}") from None
    from minigpt4 import __version__

    results = {
        "task": args.task, "metrics": metrics, "scored": len(scored), "skipped": skipped,
        "model": {**_model_record(args), "llm": model.config.llm.path, "template": talk.template,
                  "system": talk.system},
        "settings": {"prompt": prompt, "generation": dataclasses.asdict(settings),
                     "batch_size": args.batch_size, "split": args.split if args.task == "caption" else None,
                     "limit": args.limit},
        "seed": args.seed,
        "files": {name: str(getattr(args, name)) if getattr(args, name) else None
                  for name in ("questions", "annotations", "images")},
        "samples": [sample.id for sample in scored],
        "metric_versions": {**METRIC_VERSIONS, "minigpt4": __version__},
    }
    (output / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"eval {args.task}: {len(scored)} scored ({len(pending) - len(skipped)} new, "
          f"{already} already done, {len(skipped)} skipped): {summary}")
    print(f"predictions -> {predictions_path}; results -> {output / RESULTS}", file=sys.stderr)
    return 0
