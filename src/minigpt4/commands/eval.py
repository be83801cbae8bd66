"""`minigpt4 eval TASK`: answer a benchmark's questions (or caption its images) in batches, greedily, and score.

Predictions stream to OUTPUT/predictions.jsonl as each batch ends, so a run that stops (killed, out of
time) resumes where it was: a rerun skips the samples already there. OUTPUT/run.json records what the
predictions were made with, and a rerun with other settings is refused rather than mixing them. The
scores, with the model, settings, seed, sample list and metric versions, go to OUTPUT/results.json.

Under `torchrun --nproc_per_node N -m minigpt4.cli eval ...` process r answers samples r, r+N, ... into
OUTPUT/predictions.rank{r}.jsonl; when all are done, process 0 merges every file into predictions.jsonl
(dropping the rank files) and scores. A stopped sharded run resumes with any number of processes: every
predictions file in OUTPUT counts as done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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
from minigpt4.commands.paths import check_output_folder, read_appended_records
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


def read_predictions(path: Path, repair: bool = True) -> dict[str, dict]:
    """id -> record of the predictions already in `path` (`read_appended_records`: a line cut off by an
    interrupted run is dropped, any other bad line is an error)."""
    def parse(record: dict) -> tuple[str, dict]:
        return str(record["id"]), {**record, "prediction": str(record["prediction"])}

    return dict(read_appended_records(path, parse, "a prediction record", repair))


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


# ------------------------------------------------------------------------------------ the run


def _model_record(args: argparse.Namespace) -> dict:
    return {"preset": args.preset, "config": str(args.config) if args.config else None,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None, "overrides": list(args.overrides)}


def _check_run_record(path: Path, record: dict) -> str | None:
    """Write `record` (what the predictions are made with), or check it matches the one already there;
    what is wrong, or None."""
    if not path.exists():
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return None
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return f"{path} is not JSON ({err}); delete it with {PREDICTIONS} to start over"
    changed = sorted(key for key in set(before) | set(record) if before.get(key) != record.get(key))
    if changed:
        return (f"{path.parent} holds predictions made with other {', '.join(changed)} "
                f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); give another --output or delete that "
                "folder")
    return None


def _rank_file(output: Path, rank: int) -> Path:
    return output / f"predictions.rank{rank}.jsonl"


def _all_predictions(output: Path, own: Path) -> dict[str, dict]:
    """Every prediction in `output`: the merged file and any rank files (this run's or a stopped one's)."""
    done: dict[str, dict] = {}
    for path in [output / PREDICTIONS, *sorted(output.glob("predictions.rank*.jsonl"))]:
        done.update(read_predictions(path, repair=path == own))
    return done


def _merge(output: Path, order: list[str]) -> dict[str, dict]:
    """Fold the rank files (this run's, or a stopped sharded run's) into predictions.jsonl, each id once, in
    the samples' order (ids of other samples, from a run with another --limit, after them), and delete them.
    The merged file is written under another name first, so a stop here loses nothing."""
    done = _all_predictions(output, own=output / PREDICTIONS)
    wanted = set(order)
    ranked = [key for key in order if key in done] + [key for key in done if key not in wanted]
    merged = output / (PREDICTIONS + ".merging")
    merged.write_text("".join(json.dumps(done[key], ensure_ascii=False) + "\n" for key in ranked), encoding="utf-8")
    merged.replace(output / PREDICTIONS)
    for path in output.glob("predictions.rank*.jsonl"):
        path.unlink()
    return done


def _checked_options(args: argparse.Namespace) -> str:
    """Every option check that needs neither the files nor the model; the prompt to use."""
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
    if args.task in ("caption", "realphotos") and shutil.which("java") is None:
        raise CommandError(f"eval {args.task} needs Java on PATH (pycocoevalcap's PTB tokenizer and METEOR run on it); "
                           "install a Java runtime, e.g. `apt-get install default-jre-headless`")
    return prompt


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from minigpt4.chat.generation import generate
    from minigpt4.chat.templates import Message, get_template
    from minigpt4.commands.model_options import model_config_from_args
    from minigpt4.eval.tasks import TaskFileError, read_task
    from minigpt4.processing.image import eval_transform, load_batch
    from minigpt4.train.distributed import all_gather_objects, barrier, broadcast_object, init_distributed, shutdown

    prompt = _checked_options(args)
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

    # Under torchrun each process takes every world_size-th sample; alone, the process takes all.
    ctx = init_distributed("auto", model_config_from_args(args, args.overrides).device)
    try:
        problem = None
        if ctx.is_main:
            output.mkdir(parents=True, exist_ok=True)
            problem = _check_run_record(output / RUN, run_record)
        problem = broadcast_object(problem, ctx)
        if problem:
            raise CommandError(problem)
        own = _rank_file(output, ctx.rank) if ctx.enabled else output / PREDICTIONS
        done = _all_predictions(output, own)
        barrier(ctx)  # every process has read the files before any appends to them
        already = sum(sample.id in done for sample in samples)
        pending = [sample for sample in samples[ctx.rank :: ctx.world_size] if sample.id not in done]

        model = load_model(args, args.overrides)
        talk = model.chat_defaults
        settings = generation_settings(args, talk.generation)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        template = get_template(talk.template, model.tokenizer)
        transform = eval_transform(model.config.vision.image_size)
        skipped: list[str] = []
        new = 0
        with own.open("a", encoding="utf-8") as out, tqdm(total=len(pending), desc=f"eval {args.task}", unit="sample",
                                                          file=sys.stderr, disable=not ctx.is_main) as bar:
            for batch in _batches(pending, args.batch_size):
                good, pixels, errors = load_batch(
                    batch, lambda s: (s.image, f"{s.image} (sample {s.id})"), transform)
                skipped += errors
                if good:
                    asked = [s.prompt if s.prompt is not None else prompt.replace(QUESTION, s.question or "")
                             for s in good]
                    prompts = [template.render([Message("user", text, images=1)], talk.system) for text in asked]
                    completions = generate(model, prompts, [[p] for p in pixels], settings,
                                           template_stops=template.stop, add_bos=template.add_bos)
                    for sample, completion in zip(good, completions, strict=True):
                        record = {"id": sample.id, "prediction": completion.text.strip(),
                                  "finish_reason": completion.finish_reason}
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()  # a crash loses at most the batch in flight
                    new += len(good)
                bar.update(len(batch))
                bar.set_postfix(skipped=len(skipped))
        counts = all_gather_objects((new, skipped), ctx)
        barrier(ctx)  # every process has written all its predictions
        if not ctx.is_main:
            return 0
        done = _merge(output, [sample.id for sample in samples])
        skipped = [reason for _, reasons in counts for reason in reasons]
        for reason in skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        _write_results(args, output, model, settings, prompt, samples, done, skipped,
                       f"{sum(n for n, _ in counts)} new, {already} already done, {len(skipped)} skipped")
        return 0
    finally:
        shutdown(ctx)


def _write_results(args: argparse.Namespace, output: Path, model, settings, prompt: str, samples: list[Sample],
                   done: dict[str, dict], skipped: list[str], counts: str) -> None:
    """Score the samples that have a prediction and write results.json; one summary line on stdout."""
    from minigpt4 import __version__
    from minigpt4.eval.metrics import METRIC_VERSIONS
    from minigpt4.eval.tasks import score

    scored = [sample for sample in samples if sample.id in done]
    try:
        metrics = score(args.task, scored, {sample.id: done[sample.id]["prediction"] for sample in scored})
    except ValueError as err:  # references the metric cannot use (a VQA question with one answer, ...)
        raise CommandError(f"eval {args.task}: {err}; the predictions are kept in {output / PREDICTIONS}") from None
    results = {
        "task": args.task, "metrics": metrics, "scored": len(scored), "skipped": skipped,
        "model": {**_model_record(args), "llm": model.config.llm.path, "template": model.chat_defaults.template,
                  "system": model.chat_defaults.system},
        "settings": {"prompt": prompt, "generation": dataclasses.asdict(settings),
                     "batch_size": args.batch_size, "split": args.split if args.task == "caption" else None,
                     "limit": args.limit, "processes": int(os.environ.get("WORLD_SIZE", "1"))},
        "seed": args.seed,
        "files": {name: str(getattr(args, name)) if getattr(args, name) else None
                  for name in ("questions", "annotations", "images")},
        "samples": [sample.id for sample in scored],
        "metric_versions": {**METRIC_VERSIONS, "minigpt4": __version__},
    }
    (output / RESULTS).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    print(f"eval {args.task}: {len(scored)} scored ({counts}): {summary}")
    print(f"predictions -> {output / PREDICTIONS}; results -> {output / RESULTS}", file=sys.stderr)
