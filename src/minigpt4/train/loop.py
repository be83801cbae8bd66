"""`train(cfg)`: the MiniGPT-4 training loop. `_train` reads top to bottom: set up, then per step train, log, save.

One optimizer step = `grad_accum` micro-batches on every process. Its loss is the mean over every
target token of the whole global batch, exactly what one process computing the same samples as one
big batch would get: each micro-batch contributes its summed token loss divided by the global
target-token count. So the loss trajectory does not depend on how a batch is split over processes
and micro-batches (the original averaged per-process means and did not divide by `accum_grad_iters`;
with its configs, one process and accumulation 1, the two agree).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from minigpt4.chat.templates import VICUNA_IMAGE
from minigpt4.config import ConfigError, DataConfig, TrainJobConfig, check_ranges, to_dict
from minigpt4.model.build import build_job_model
from minigpt4.model.minigpt4 import MiniGPT4
from minigpt4.processing.prompt import (
    IGNORE_INDEX,
    LayoutBatch,
    collate_layouts,
    conversation_turns,
    layout_batch,
    layout_conversation,
    pad_token_id,
)
from minigpt4.train import checkpoint as ckpt
from minigpt4.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
    wrap_ddp,
    wrap_fsdp,
)
from minigpt4.train.optim import build_optimizer
from minigpt4.train.schedule import lr_at

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOG_NAME = "train_log.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss was NaN or infinite for `train.max_nonfinite_steps` steps in a row; a checkpoint was written."""


@dataclass
class TrainResult:
    final_loss: float  # the loss of the last step (mean over the global batch's target tokens)
    steps: int  # optimizer steps done in total (including those before a resume)
    tokens_per_second: float  # all processes together; see `train`
    samples_per_second: float
    checkpoint: Path | None  # the last checkpoint written
    log_dir: Path  # holds train_log.jsonl and tensorboard/
    skipped: int  # bad samples skipped over the whole run
    nonfinite_steps: int  # steps skipped for a NaN/inf loss over the whole run
    losses: list[float]  # the loss of every step this call ran
    stopped_by_signal: bool = False  # SIGTERM arrived: saved and stopped early; resume to continue


class StopOnSigterm:
    """Remembers a SIGTERM (a scheduler's pre-emption notice, or torchrun passing one on) so the loop can
    finish its step, save and stop, instead of dying and losing the steps since the last checkpoint."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def __enter__(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class CaptionLoss(nn.Module):
    """Images (or cached frozen features) + laid-out texts -> the SUM of target-token losses.

    This is the module DDP (or FSDP) wraps, so that the forward runs through the wrapper and the trainable
    gradients are all-reduced on backward.
    """

    def __init__(self, model: MiniGPT4, length_buckets: int = 1):
        super().__init__()
        self.model = model
        self.length_buckets = length_buckets

    def forward(self, inputs: torch.Tensor, are_features: bool, batch: LayoutBatch) -> torch.Tensor:
        if are_features:
            image_embeds = self.model.project(inputs)  # (B, Q, H_llm)
        else:
            image_embeds = self.model.encode_images(inputs)  # (B, Q, H_llm)
        # The same three steps as MiniGPT4.loss_from_image_embeds, with the layout made by the
        # caller, which needs its token counts for the global-batch mean and for tokens/s.
        mean = self.model.lm_loss(self.model.embed(batch, image_embeds), batch.attention_mask, batch.labels,
                                  length_buckets=self.length_buckets)
        return mean * target_count(batch)


def target_count(batch: LayoutBatch) -> torch.Tensor:
    """Tokens the loss is taken over (labels shifted by one, as the causal loss uses them)."""
    return (batch.labels[:, 1:] != IGNORE_INDEX).sum()


def open_batches(cfg: TrainJobConfig, ctx: DistContext, start_batch: int, model: MiniGPT4,
                 positions: dict[str, int] | None = None) -> Iterator[dict]:
    """The infinite batch stream of this process, starting at its `start_batch`-th batch.

    `positions`: where each reader stood at that batch (a checkpoint's data.positions), so the readers
    fast-forward without decoding the images they pass.
    """
    from minigpt4.processing.image import eval_transform, train_transform

    if cfg.data.feature_cache:
        from minigpt4.feature_cache import cached_batches

        return cached_batches(cfg, model, rank=ctx.rank, world_size=ctx.world_size, start_batch=start_batch)

    datasets = cfg.data.datasets
    size = cfg.model.vision.image_size
    transform = train_transform(size) if cfg.data.augment else eval_transform(size)
    common = dict(seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size,
                  num_workers=cfg.data.num_workers, start_batch=start_batch, positions=positions,
                  max_image_bytes=cfg.data.max_image_bytes)
    kinds = {d.kind for d in datasets}
    try:
        if kinds == {"webdataset"}:
            from minigpt4.data.webdataset import stage1_batches

            return stage1_batches([(d.path, d.ratio) for d in datasets], transform, cfg.data.batch_size,
                                  shuffle_buffer=cfg.data.shuffle_buffer,
                                  process_captions=cfg.data.process_captions, **common)
        if kinds == {"aligned"} and len(datasets) == 1:
            from minigpt4.data.aligned import stage2_batches

            return stage2_batches(datasets[0].path, transform, cfg.data.batch_size, **common)
        if kinds == {"conversations"} and len(datasets) == 1:
            from minigpt4.data.conversations import conversation_batches

            return conversation_batches(datasets[0].path, transform, cfg.data.batch_size, **common)
    except ValueError as err:  # the readers' checks of what they were given: remote shards, too few pairs, bad JSON
        raise ConfigError(f"data.datasets: {err}") from err
    raise ConfigError(
        "data.datasets must be one or more kind=webdataset sources (stage 1), or exactly one kind=aligned "
        f"folder or kind=conversations file (stage 2); got {[(d.kind, d.path) for d in datasets]}"
    )


def is_conversations(cfg: TrainJobConfig) -> bool:
    """Whether the job trains on conversations (their questions are the prompts)."""
    return any(d.kind == "conversations" for d in cfg.data.datasets)


def load_prompts_for(cfg: TrainJobConfig) -> list[str | None]:
    """The instruction prompts to draw from; [None] means no prompt (stage 1, or conversations)."""
    if not cfg.data.prompts or is_conversations(cfg):
        return [None]
    from minigpt4.data.prompts import load_prompts

    prompts = load_prompts(None if cfg.data.prompts == "default" else cfg.data.prompts, cfg.data.prompt_template)
    if not prompts:
        raise ConfigError(f"data.prompts={cfg.data.prompts!r} holds no line with <ImageHere>")
    return prompts


def conversation_batch(model: MiniGPT4, texts: list[str], data: DataConfig) -> LayoutBatch:
    """A training batch of conversations (each text: its exchanges as JSON, see `minigpt4.data.conversations`):
    every question wrapped in `data.prompt_template`, the image before the first one in the chat templates'
    image tags, every answer + `data.end_sym` learned (`data.max_txt_len` tokens at most each)."""
    samples = [layout_conversation(model.tokenizer, conversation_turns(data.prompt_template, json.loads(text),
                                                                       data.end_sym, VICUNA_IMAGE),
                                   model.num_image_tokens, data.end_sym, data.max_txt_len) for text in texts]
    return collate_layouts(samples, pad_token_id(model.tokenizer), padding_side="right")


def check_config(cfg: TrainJobConfig) -> None:
    """Fail before building anything on settings that cannot work (ranges, then combinations)."""
    check_ranges(cfg)  # again: the config may have been built or edited in Python, not through from_dict
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty: list at least one dataset (kind, path)")
    if is_conversations(cfg) and cfg.data.prompts:
        raise ConfigError(f"data.prompts={cfg.data.prompts!r} with a kind=conversations dataset: its questions are "
                          "the prompts; set data.prompts to '' (data.prompt_template still wraps each question)")
    if is_conversations(cfg) and cfg.data.prompt_template.count("{}") != 1:
        raise ConfigError(f"data.prompt_template={cfg.data.prompt_template!r} must contain exactly one '{{}}' "
                          "(where each question goes), e.g. '###Human: {} ###Assistant: '")
    if cfg.train.precision == "fp16" and torch.device(cfg.model.device).type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU (model.device=cuda); "
                          "on CPU use train.precision=bf16 or fp32")


def resolve_resume(cfg: TrainJobConfig) -> Path | None:
    if cfg.train.resume == "auto":
        found = ckpt.latest_checkpoint(cfg.train.output_dir)
        if found is None:
            log.info("train.resume=auto: no checkpoint in %s yet, starting fresh", cfg.train.output_dir)
        return found
    return Path(cfg.train.resume) if cfg.train.resume else None


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the JSONL records of steps <= `step` (rewritten atomically).

    A line that does not parse is what a crash in the middle of a write leaves at the end: it is dropped
    with a warning, so the resumed run appends to whole lines.
    """
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            log.warning("%s line %d is torn or not a JSON record (a crash mid-write?): dropped (%r)", path, number,
                        line[:80])
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    if kept != lines or (text and not text.endswith("\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainJobConfig) -> TrainResult:
    """Train the trainable parts of MiniGPT-4 as `cfg` says; returns the final numbers.

    tokens/s counts LLM input positions (BOS + prompt + image positions + target tokens, padding
    excluded) of every process, per second of wall time, over all steps after the first.
    A step whose loss is not finite is skipped and counted; `train.max_nonfinite_steps` of them in a row
    raise TrainingDiverged after writing a checkpoint. A checkpoint that cannot be written (full disk)
    raises ckpt.CheckpointSaveError; the previous checkpoints stay as they were.
    """
    check_config(cfg)
    ctx = init_distributed(cfg.train.backend, cfg.model.device)
    try:
        result = _train(cfg, ctx)
        # Rank 0 may still be writing the last checkpoint or log: no process tears its connections down before every
        # process is done (gloo aborts a process whose peer closes under it). Not on an error: a barrier could hang.
        barrier(ctx)
        return result
    finally:
        shutdown(ctx)


def _train(cfg: TrainJobConfig, ctx: DistContext) -> TrainResult:
    """The loop, in the order it runs: set up, then per step: train, log, checkpoint."""
    run = _setup(cfg, ctx)
    t = cfg.train
    stop = StopOnSigterm()
    log_file, board = run.jsonl or contextlib.nullcontext(), run.board or contextlib.nullcontext()
    with run.progress, logging_redirect_tqdm(), log_file, board, stop:  # closed however the loop ends
        for step in range(run.start_step, run.total_steps):
            outcome = _train_step(run, step, stop_requested=stop.received)
            _log_step(run, step, outcome)
            done = step + 1
            if run.nonfinite_in_a_row >= t.max_nonfinite_steps:
                path = _save(run, done, "non-finite losses")
                raise TrainingDiverged(
                    f"the loss was not finite in {run.nonfinite_in_a_row} steps in a row (steps "
                    f"{done - run.nonfinite_in_a_row + 1}-{done}, last {outcome.loss}, lr {outcome.lr:.3e}); those "
                    f"steps were skipped and training stopped, the last good weights saved to {path}. Lower "
                    "train.lr, use train.precision=bf16 or fp32, or set train.clip_grad_norm, then resume with "
                    "train.resume=auto."
                )
            if done % run.save_every == 0 or done == run.total_steps or outcome.stop:
                run.last_checkpoint = _save(run, done, "SIGTERM" if outcome.stop else f"step {done}")
            if outcome.stop:
                run.stopped = True
                log.warning("SIGTERM: stopped after step %d of %d and saved %s; continue with train.resume=auto",
                            done, run.total_steps, run.last_checkpoint)
                break
    return _finish(run)


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


@dataclass
class Window:
    """Sums over a run of steps."""

    loss: float = 0.0  # finite losses only
    finite_steps: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: TrainJobConfig
    ctx: DistContext
    model: MiniGPT4
    loss_fn: nn.Module  # CaptionLoss, wrapped for DDP or FSDP
    fsdp: bool
    trainable: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    prompts: list[str | None]
    batches: Iterator[dict]
    out: Path
    start_step: int
    total_steps: int
    save_every: int
    resumed_from: Path | None
    jsonl: IO[str] | None
    board: object | None  # a tensorboard SummaryWriter
    progress: tqdm
    positions: dict[str, int] = field(default_factory=dict)  # this process's readers: items consumed so far
    skipped_total: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    last_checkpoint: Path | None = None
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    window: Window = field(default_factory=Window)  # since the last log record
    steady: Window = field(default_factory=Window)  # every step after the first, for throughput


def _setup(cfg: TrainJobConfig, ctx: DistContext) -> Run:
    """Build the model and optimizer, restore a checkpoint if resuming, open the data and the outputs."""
    t = cfg.train
    # Model: every process builds identical frozen towers (same files, or same seed when random).
    # With FSDP it is built on the CPU and each process then moves only its shard to its device.
    fsdp = t.strategy == "fsdp" and ctx.enabled
    model = build_job_model(cfg, device="cpu" if fsdp else str(ctx.device))
    resume_path = resolve_resume(cfg)
    state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        ckpt.load_trainable_state_dict(model, state["model"], str(resume_path))
    model.train()
    caption_loss = CaptionLoss(model, t.length_buckets)
    loss_fn = wrap_fsdp(caption_loss, model.llm, ctx) if fsdp else wrap_ddp(caption_loss, ctx)
    optimizer = build_optimizer(model, t)  # after wrapping: it must hold the tensors training updates
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=t.precision == "fp16")
    total_steps = t.epochs * t.iters_per_epoch

    start_step, skipped_total, nonfinite_total, positions = 0, 0, 0, {}
    if state is None:
        seed_everything(t.seed + ctx.rank)  # the original's seed + rank
    else:
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        start_step, skipped_total = state["step"], state["skipped"]
        nonfinite_total = state.get("nonfinite_steps", 0)
        positions = state["data"].get("positions", {})
        saved = state["config"]
        if saved["data"] != to_dict(cfg.data) or saved["train"]["seed"] != t.seed or \
                saved["train"]["grad_accum"] != t.grad_accum:
            log.warning("%s was written with other data settings, seed or grad_accum: the data position it "
                        "records does not carry over exactly", resume_path)
        if len(state["rng"]) == ctx.world_size:
            ckpt.set_rng_state(state["rng"][ctx.rank], ctx.device)
        else:
            log.warning("%s was written by %d processes, this run has %d: random streams restart from the seed",
                        resume_path, len(state["rng"]), ctx.world_size)
            seed_everything(t.seed + ctx.rank + start_step)
        log.info("resumed from %s at step %d of %d", resume_path, start_step, total_steps)

    out = Path(t.output_dir)
    jsonl, board = _open_outputs(cfg, ctx, out, start_step, total_steps)
    return Run(
        cfg=cfg, ctx=ctx, model=model, loss_fn=loss_fn, fsdp=fsdp,
        trainable=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer, scaler=scaler,
        autocast=torch.autocast(ctx.device.type, dtype=AUTOCAST_DTYPES.get(t.precision),
                                enabled=t.precision != "fp32"),
        prompts=load_prompts_for(cfg),
        batches=open_batches(cfg, ctx, start_batch=start_step * t.grad_accum, model=model, positions=positions),
        out=out, start_step=start_step, total_steps=total_steps, save_every=t.save_every or t.iters_per_epoch,
        resumed_from=resume_path, jsonl=jsonl, board=board,
        progress=tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not ctx.is_main,
                      dynamic_ncols=True),
        positions=dict(positions), skipped_total=skipped_total, nonfinite_total=nonfinite_total,
    )


def _open_outputs(cfg: TrainJobConfig, ctx: DistContext, out: Path, start_step: int,
                  total_steps: int) -> tuple[IO[str] | None, object | None]:
    """Rank 0's train_log.jsonl (opened for appending) and tensorboard writer; (None, None) elsewhere."""
    if not ctx.is_main:
        return None, None
    t = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    # A resumed run redoes the steps after its checkpoint: drop what the killed run logged for them.
    drop_records_after(out / LOG_NAME, start_step)
    jsonl = (out / LOG_NAME).open("a")
    board = None
    if t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    log.info("training %d steps (%d epochs x %d), global batch %d = %d per process x %d processes "
             "x %d micro-batches",
             total_steps, t.epochs, t.iters_per_epoch, cfg.data.batch_size * ctx.world_size * t.grad_accum,
             cfg.data.batch_size, ctx.world_size, t.grad_accum)
    return jsonl, board


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    loss: float  # mean over the global batch's target tokens; NaN/inf when the step was skipped
    lr: float
    samples: int  # all processes together
    tokens: int
    seconds: float
    stop: bool  # some process received SIGTERM: every process stops after this step


def _train_step(run: Run, step: int, stop_requested: bool) -> StepOutcome:
    """Read `grad_accum` micro-batches, run forward/backward, and update the weights unless the loss is not finite."""
    t, ctx = run.cfg.train, run.ctx
    step_start = time.perf_counter()
    lr = lr_at(step, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    # Data: `grad_accum` micro-batches; the bad samples the loader skipped (and logged) are counted.
    micro = [next(run.batches) for _ in range(t.grad_accum)]
    for batch in micro:
        run.positions.update(batch.get("position", {}))
    run.skip_reasons.update(bad.reason.split(":")[0] for batch in micro for bad in batch["skipped"])
    layouts = []
    for index, batch in enumerate(micro):
        if is_conversations(run.cfg):
            layouts.append(conversation_batch(run.model, batch["text"], run.cfg.data).to(ctx.device))
            continue
        # One prompt per micro-batch, as the original; drawn from (seed, rank, batch index)
        # so that a resumed run draws the same ones.
        batch_index = step * t.grad_accum + index
        prompt = random.Random(f"{t.seed}:{ctx.rank}:{batch_index}").choice(run.prompts)
        layouts.append(layout_batch(run.model.tokenizer, batch["text"], run.model.num_image_tokens, prompt,
                                    run.cfg.data.end_sym, run.cfg.data.max_txt_len).to(ctx.device))
    local = torch.tensor([sum(int(target_count(b)) for b in layouts),
                          sum(int(b.attention_mask.sum()) for b in layouts),
                          sum(len(b["text"]) for b in micro),
                          sum(len(b["skipped"]) for b in micro)], device=ctx.device)
    targets, tokens, samples, skipped = all_reduce_sum(local, ctx).tolist()
    run.skipped_total += skipped

    # Forward/backward; gradients are all-reduced only on the last micro-batch.
    loss_sum = torch.zeros((), device=ctx.device)
    for index, (batch, layout) in enumerate(zip(micro, layouts)):
        last = index == len(micro) - 1
        sync = contextlib.nullcontext() if last or run.fsdp or not ctx.enabled else run.loss_fn.no_sync()
        are_features = "features" in batch
        inputs = (batch["features"] if are_features else batch["image"]).to(ctx.device, non_blocking=True)
        with sync:
            with run.autocast:
                part = run.loss_fn(inputs, are_features, layout)
            # Gradients get averaged over processes; * world_size turns that into a sum.
            run.scaler.scale(part.float() * ctx.world_size / targets).backward()
        loss_sum += part.detach().float()
    if run.fsdp:
        all_reduce_gradients(run.trainable, ctx)  # FSDP leaves the trainable weights to us
    # The stop flag rides along, so all processes stop after the same step.
    stop_flag = torch.tensor(float(stop_requested), device=ctx.device)
    loss_total, stop_votes = all_reduce_sum(torch.stack([loss_sum, stop_flag]), ctx).tolist()
    loss = loss_total / targets

    # Update, or skip a step whose loss is not finite (every process sees the same global loss).
    if math.isfinite(loss):
        run.nonfinite_in_a_row = 0
        if t.clip_grad_norm > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.trainable, t.clip_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.nonfinite_in_a_row += 1
        run.nonfinite_total += 1
        if run.scaler.is_enabled():  # what GradScaler does on an overflow: lower the scale, apply nothing
            run.scaler.update(run.scaler.get_scale() * run.scaler.get_backoff_factor())
        log.warning("step %d: the loss is %s; step skipped (%d in a row, %d so far; train.max_nonfinite_steps=%d)",
                    step + 1, loss, run.nonfinite_in_a_row, run.nonfinite_total, t.max_nonfinite_steps)
    run.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss=loss, lr=lr, samples=int(samples), tokens=int(tokens),
                       seconds=time.perf_counter() - step_start, stop=bool(stop_votes))


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def _log_step(run: Run, step: int, outcome: StepOutcome) -> None:
    """Progress bar every step; a train_log.jsonl record, a console line and tensorboard every `log_every` steps."""
    t, ctx = run.cfg.train, run.ctx
    done = step + 1
    finite = math.isfinite(outcome.loss)
    run.losses.append(outcome.loss)
    windows = (run.window, run.steady) if step > run.start_step else (run.window,)  # step 1 pays for lazy init
    for window in windows:
        window.loss += outcome.loss if finite else 0.0
        window.finite_steps += finite
        window.samples += outcome.samples
        window.tokens += outcome.tokens
        window.seconds += outcome.seconds
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{outcome.lr:.2e}")
    if not ctx.is_main or (done % t.log_every != 0 and done != run.total_steps):
        return
    window = run.window
    elapsed = time.perf_counter() - window.start
    record = {
        "step": done, "epoch": step // t.iters_per_epoch, "loss": outcome.loss if finite else None,
        "loss_avg": window.loss / window.finite_steps if window.finite_steps else None, "lr": outcome.lr,
        "samples_per_s": window.samples / elapsed, "tokens_per_s": window.tokens / elapsed,
        "tokens_per_s_per_device": window.tokens / elapsed / ctx.world_size,
        "skipped": run.skipped_total, "nonfinite_steps": run.nonfinite_total, "time": time.time(),
    }
    log.info("step %d/%d  epoch %d  loss %.4f (avg %s)  lr %.3e  %.1f samples/s  %.0f tokens/s "
             "(%.0f per device; LLM input positions incl. image, excl. padding)",
             done, run.total_steps, record["epoch"], outcome.loss,
             "-" if record["loss_avg"] is None else f"{record['loss_avg']:.4f}", outcome.lr,
             record["samples_per_s"], record["tokens_per_s"], record["tokens_per_s_per_device"])
    run.jsonl.write(json.dumps(record) + "\n")
    run.jsonl.flush()
    if run.board is not None:
        for key in ("loss", "loss_avg", "lr", "samples_per_s", "tokens_per_s"):
            if record[key] is not None:
                run.board.add_scalar(f"train/{key}", record[key], done)
        run.board.flush()
    run.window = Window()


# --------------------------------------------------------------------------------------------
# Checkpoints and the end
# --------------------------------------------------------------------------------------------


def _save(run: Run, step: int, reason: str) -> Path:
    """Collective: every process hands in its RNG state, rank 0 writes; a failed write raises on every process."""
    ctx, t = run.ctx, run.cfg.train
    rngs = all_gather_objects(ckpt.rng_state(ctx.device), ctx)
    positions = {key: n for ranks in all_gather_objects(run.positions, ctx) for key, n in ranks.items()}
    path = ckpt.checkpoint_path(run.out, step)
    failure = None
    if ctx.is_main:
        try:
            ckpt.save_atomic({
                "format": ckpt.FORMAT, "model": ckpt.trainable_state_dict(run.model),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                "step": step, "epoch": step // t.iters_per_epoch,
                "data": {"batches": step * t.grad_accum, "positions": positions},
                "rng": rngs, "skipped": run.skipped_total, "nonfinite_steps": run.nonfinite_total,
                "config": to_dict(run.cfg), "chat": ckpt.chat_record(run.cfg, run.model),
            }, path)
        except ckpt.CheckpointSaveError as err:
            failure = str(err)
        else:
            for old in ckpt.prune_checkpoints(run.out, t.keep_last):
                log.debug("removed old checkpoint %s", old)
            log.info("saved checkpoint %s (%s)", path, reason)
    failure = broadcast_object(failure, ctx)  # also keeps the other processes from running ahead
    if failure is not None:
        raise ckpt.CheckpointSaveError(failure)
    return path


def _finish(run: Run) -> TrainResult:
    rate = run.steady.seconds or float("nan")
    result = TrainResult(
        final_loss=run.losses[-1] if run.losses else float("nan"),
        steps=run.start_step + len(run.losses),
        tokens_per_second=run.steady.tokens / rate,
        samples_per_second=run.steady.samples / rate,
        checkpoint=run.last_checkpoint or run.resumed_from,
        log_dir=run.out,
        skipped=run.skipped_total,
        nonfinite_steps=run.nonfinite_total,
        losses=run.losses,
        stopped_by_signal=run.stopped,
    )
    if run.ctx.is_main:
        reasons = ", ".join(f"{n} {r}" for r, n in run.skip_reasons.most_common()) or "none in this session"
        log.info("done: %d steps, final loss %.4f, %.0f tokens/s, %.1f samples/s; skipped %d bad samples (%s); "
                 "%d steps skipped for a non-finite loss",
                 result.steps, result.final_loss, result.tokens_per_second, result.samples_per_second,
                 result.skipped, reasons, result.nonfinite_steps)
    return result
