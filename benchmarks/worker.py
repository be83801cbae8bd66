"""Run one benchmark variant and print its result as the last stdout line (`RESULT {json}`).

    python -m benchmarks.worker '<Spec as JSON>'

`benchmarks.run` starts one of these per variant, so each variant's peak memory is its own. Every
variant builds the same model from the same seed (random towers; the LLM named by the spec) and
trains on, or answers about, the same images and texts, so losses can be compared across variants.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.peak import clock, matmul_peak, uses_cpu_clock
from benchmarks.spec import Spec

log = logging.getLogger("benchmarks.worker")

RESULT_PREFIX = "RESULT "
# Vicuna-7B (LLaMA-7B) dimensions, for a random-weight LLM on a GPU.
VICUNA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# Words for synthetic captions; lengths are set in tokens, the wording only has to look like text.
WORDS = (
    "a small red cat sits on the wooden table next to a blue cup while warm light comes through the open "
    "window and two birds fly over green trees in the quiet park near an old stone bridge"
).split()
STAGE_LAYOUT = {
    # layout: (shortest and longest target in tokens before truncation, end_sym, max_txt_len, prompt?)
    "stage1": ((8, 32), "\n", 32, False),
    "stage2": ((80, 200), "###", 160, True),
}


# ------------------------------------------------------------------------------------ memory, time


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last `reset_peak_memory` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device) -> float:
    """Start peak-memory accounting here (model building and data preparation are left out).

    Returns the peak so far (GiB).
    """
    gc.collect()
    _return_free_heap()
    before = peak_memory_gib(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        log.warning("cannot reset the peak RSS; it includes model building")
    return before


def _return_free_heap() -> None:
    """Give memory freed while building (e.g. fp32 weights cast to bf16) back to the OS (glibc only).

    Otherwise the fragmented heap keeps it resident and a bf16 model looks bigger than an fp32 one.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()` and its wall time."""
    out, wall, _ = timed_both(device, fn)
    return out, wall


def timed_both(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """`fn()`, its wall time and its time by `benchmarks.peak.clock` (one CPU thread: this process's CPU time)."""
    now = clock(device)
    sync(device)
    start, start_clock = time.perf_counter(), now()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, now() - start_clock


# ------------------------------------------------------------------------------------ FLOPs


def _register_cpu_flash_flops() -> None:
    """torch's FlopCounterMode has no formula for the CPU flash-attention kernel; count it like the GPU one."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    if forward in fc.flop_registry:
        return

    @fc.register_flop_formula(forward)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn` once, counting matmul/conv/attention FLOPs (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash_flops()
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


# ------------------------------------------------------------------------------------ model


def tiny_llm_dir(workdir: str) -> Path:
    """The random 2-layer LLaMA + SentencePiece tokenizer, built once per workdir."""
    from minigpt4.testing import build_tiny_llm

    path = Path(workdir) / "tiny-llm"
    if not (path / "config.json").is_file():
        build_tiny_llm(path)
    return path


def model_config(spec: Spec):
    from minigpt4.config import ModelConfig, model_preset

    cfg = model_preset("tiny") if spec.dims == "tiny" else ModelConfig()
    if spec.dims not in ("tiny", "original"):
        raise ValueError(f"dims={spec.dims!r}: choose tiny or original")
    sw = spec.switches
    cfg.device = spec.device
    cfg.dtype = variant_dtype(spec)
    cfg.attn_implementation = "sdpa" if sw.sdpa else "eager"
    cfg.llm.attn_implementation = cfg.attn_implementation
    return cfg


def variant_dtype(spec: Spec) -> str:
    """The dtype name the variant's weights are stored in (and its step autocasts to, when not fp32).

    "original": what the original's configs run on the device: fp32 on a CPU (its autocast is off there
    and its fp16 ViT cannot take fp32 pixels, so a CPU user runs vit_precision fp32), fp16 on a GPU.
    "auto": our model.dtype=auto (fp32 on a CPU without native bf16, bf16 on a bf16 GPU).
    """
    from minigpt4.precision import resolve_dtype

    if spec.switches.dtype == "original":
        return "float32" if torch.device(spec.device).type == "cpu" else "float16"
    if spec.switches.dtype == "auto":
        return str(resolve_dtype("auto", spec.device)[0]).removeprefix("torch.")
    return spec.switches.dtype


def build(spec: Spec):
    """The MiniGPT4 the spec describes: random towers seeded by `spec.seed`, identical across variants.

    The first fp32 variant of a run saves its towers to the workdir and later variants load them
    (strictly, as `MiniGPT4.from_pretrained` does): random init of the 1B-parameter ViT takes a minute.
    """
    from safetensors.torch import load_file, save_file

    from minigpt4.model.llm import DTYPES, load_llm
    from minigpt4.model.minigpt4 import MiniGPT4

    cfg = model_config(spec)
    dtype = DTYPES[cfg.dtype]
    if spec.llm == "vicuna7b":
        layers = {"num_hidden_layers": spec.llm_layers} if spec.llm_layers else {}
        llm, tokenizer = random_llama(spec, {**VICUNA_7B, **layers}, dtype, cfg.llm.attn_implementation)
    else:
        if spec.llm == "tiny":
            cfg.llm.path = str(tiny_llm_dir(spec.workdir))
        elif spec.llm == "smollm2":
            from minigpt4.embedded import prepare_smollm2

            cfg.llm.path = str(prepare_smollm2())
        else:
            cfg.llm.path = spec.llm
        llm, tokenizer = load_llm(cfg.llm, dtype, spec.device)
    towers = Path(spec.workdir or tempfile.gettempdir()) / (
        f"towers-{spec.dims}-{llm.config.hidden_size}-seed{spec.seed}.safetensors")
    if spec.workdir and towers.is_file():
        model = MiniGPT4(cfg, llm, tokenizer, towers_on_meta=True)
        # Copies, not views of the file's memory map: a view kept alive (the fp32 projection of a bf16
        # model) would keep the whole 4 GB mapping resident and count in the peak memory.
        state = {key: tensor.clone() for key, tensor in load_file(str(towers)).items()}
        model.load_tower_state_dict(state, source=str(towers))
    else:
        torch.manual_seed(spec.seed)
        model = MiniGPT4(cfg, llm, tokenizer)
        if spec.workdir and cfg.dtype == "float32":
            save_file({k: v.detach().contiguous() for k, v in model.tower_state_dict().items()}, str(towers))
    model.lock()
    return model.place(spec.device, dtype)


def random_llama(spec: Spec, dims: dict, dtype: torch.dtype, attn_implementation: str):
    """A randomly initialised LLaMA built directly on the device (no 13 GB folder), and a tokenizer.

    The tokenizer is the tiny test one: lengths are set in tokens, so only token counts matter here.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minigpt4.model.llm import load_tokenizer

    torch.manual_seed(spec.seed)
    with torch.device(spec.device):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**dims), dtype=dtype,
                                               attn_implementation=attn_implementation)
    llm.requires_grad_(False)
    llm.eval()
    llm.config.use_cache = False
    return llm, load_tokenizer(tiny_llm_dir(spec.workdir))


def compile_model(model) -> None:
    """torch.compile the heavy frozen modules in place (parameter names stay the same)."""
    for module in (model.vision, model.qformer, model.llm.base_model):
        module.compile()


# ------------------------------------------------------------------------------------ data


def text_with_tokens(tokenizer, length: int, offset: int) -> str:
    """Words from WORDS (starting at `offset`) until the text is `length` tokens long."""
    words: list[str] = []
    index = offset
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < length:
        words.append(WORDS[index % len(WORDS)])
        index += 1
    return " ".join(words)


def target_lengths(batch: int, shortest: int, longest: int) -> list[int]:
    """Evenly spread lengths, so a batch has realistic padding."""
    if batch == 1:
        return [longest]
    return [round(shortest + (longest - shortest) * i / (batch - 1)) for i in range(batch)]


def write_dataset(spec: Spec, tokenizer, root: Path, image_size: int) -> None:
    """A cc_sbu_align-style folder of `spec.batch` drawn images and texts of set token lengths."""
    from minigpt4.data.synthetic import draw_scene, write_stage2

    (shortest, longest), *_ = STAGE_LAYOUT[spec.layout]
    items = []
    for i, length in enumerate(target_lengths(spec.batch, shortest, longest)):
        image, _ = draw_scene(spec.seed * 1000 + i, size=image_size)
        items.append((f"{i:05d}", image, text_with_tokens(tokenizer, length, offset=7 * i)))
    write_stage2(root, items)


# ------------------------------------------------------------------------------------ training


@dataclass
class TrainSetup:
    """One variant's training step, ready to run on its fixed batch."""

    step: Callable[[], float]  # forward + backward + AdamW; returns the loss
    tokens: int  # LLM input positions incl. image, excl. padding
    padded_positions: int
    compute_dtype: str
    cache_build_times: list[float]


def train_setup(spec: Spec, model, scratch: Path) -> TrainSetup:
    """The spec's data (written to `scratch`), layout, loss and optimizer, as one `step` callable."""
    from minigpt4.config import TrainConfig
    from minigpt4.data.aligned import stage2_batches
    from minigpt4.data.prompts import load_prompts
    from minigpt4.feature_cache import FeatureCache, build_cache, feature_batches
    from minigpt4.model.llm import DTYPES
    from minigpt4.processing.image import eval_transform
    from minigpt4.processing.prompt import VICUNA_V0_TEMPLATE, layout_batch
    from minigpt4.train.loop import CaptionLoss, target_count

    sw = spec.switches
    device = model.device
    size = model.config.vision.image_size
    transform = eval_transform(size)
    root = scratch / "data"
    write_dataset(spec, model.tokenizer, root, size)
    _, end_sym, max_txt_len, with_prompt = STAGE_LAYOUT[spec.layout]
    prompt = load_prompts(None, VICUNA_V0_TEMPLATE)[0] if with_prompt else None

    cache_build_times: list[float] = []
    if sw.cache:
        # Built `steps` times (the last one is used), so its cost per image is a min/median/max too.
        for _ in range(spec.steps):
            *_, seconds = timed_both(device, lambda: build_cache(model, [("aligned", str(root))],
                                                                 scratch / "cache", transform, views=1,
                                                                 batch_size=spec.batch))
            cache_build_times.append(seconds)
        batch = next(feature_batches(FeatureCache(scratch / "cache", model, transform), spec.batch, seed=spec.seed))
        inputs = batch["features"].to(device)
    else:
        batch = next(stage2_batches(str(root), transform, spec.batch, seed=spec.seed))
        inputs = batch["image"].to(device)
    layout = layout_batch(model.tokenizer, batch["text"], model.num_image_tokens, prompt, end_sym, max_txt_len)
    layout = layout.to(device)
    tokens = int(layout.attention_mask.sum())  # LLM input positions incl. image, excl. padding
    dtype_name = variant_dtype(spec)
    compute_dtype = DTYPES[dtype_name]
    if sw.transformers:
        loss_fn, trainable = transformers_trainee(spec, model, layout, inputs, scratch, compute_dtype)
    else:
        if sw.compile:
            compile_model(model)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if sw.target_logits:
            # The training loop's own loss module and normalisation (minigpt4 train, one process).
            caption_loss = CaptionLoss(model, length_buckets=sw.length_buckets)
            targets = target_count(layout)

            def loss_fn() -> torch.Tensor:
                return caption_loss(inputs, sw.cache, layout).float() / targets
        else:
            def loss_fn() -> torch.Tensor:
                # The original's step: logits at every position, as llm(..., labels=...) computes them.
                image_embeds = model.project(inputs) if sw.cache else model.encode_images(inputs)
                return model.lm_loss(model.embed(layout, image_embeds), layout.attention_mask, layout.labels,
                                     length_buckets=sw.length_buckets, full_logits=True)

    config = TrainConfig()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    def step() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return TrainSetup(step, tokens, int(layout.attention_mask.numel()), dtype_name, cache_build_times)


def run_train(spec: Spec, model, scratch: Path) -> dict:
    """Time training steps of the spec's layout; report throughput, loss, memory and FLOPs."""
    from minigpt4.model.llm import DTYPES

    setup = train_setup(spec, model, scratch)
    step, tokens, device = setup.step, setup.tokens, torch.device(spec.device)
    setup_peak = reset_peak_memory(device)
    losses: list[float] = []
    flops = None
    for index in range(spec.warmup):
        if index == 0 and not spec.switches.compile:
            loss, flops = count_flops(step)
        else:
            loss = step()
        losses.append(loss)
    # The matmul peak in this process, right before its timed steps (same threads, same moment's load).
    peak = matmul_peak(DTYPES[setup.compute_dtype], spec.device)
    times, wall_times = [], []
    for _ in range(spec.steps):
        loss, wall, seconds = timed_both(device, step)
        losses.append(loss)
        times.append(seconds)
        wall_times.append(wall)
    step_s = statistics.median(times)
    return {
        "tokens_per_step": tokens,
        "padded_positions": setup.padded_positions,
        "step_s": step_s,  # the median
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_times": times,
        "clock": "cpu" if uses_cpu_clock(device) else "wall",  # what step_times (and the peak) were timed by
        "wall_step_times": wall_times,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_min": tokens / max(times),
        "tokens_per_s_max": tokens / min(times),
        "samples_per_s": spec.batch / step_s,
        "loss": losses[0],  # the first step: same weights, same batch in every variant
        "losses": losses,
        "flops_per_step": flops,
        "flops_per_s": flops / step_s if flops else None,
        "flops_per_s_best": flops / min(times) if flops else None,
        "compute_dtype": setup.compute_dtype,
        "worker_peak_flops": peak,
        "cache_build_s": statistics.median(setup.cache_build_times) if setup.cache_build_times else None,
        "cache_build_times": setup.cache_build_times,
        "cache_images": spec.batch if spec.switches.cache else None,
        "peak_memory_gib": peak_memory_gib(device),
        "peak_setup_gib": setup_peak,
    }


def transformers_trainee(spec: Spec, model, layout, pixels: torch.Tensor, scratch: Path, dtype: torch.dtype):
    """transformers' Blip2ForConditionalGeneration holding `model`'s weights (our export, written once per
    workdir), frozen but for language_projection, and its loss on `layout` as one would train it:
    `forward(pixel_values, input_ids, attention_mask, labels).loss`.

    Our model's weights are released once exported (only the transformers model stays in memory).
    Returns the loss function and the trainable parameters.
    """
    from transformers import Blip2ForConditionalGeneration

    from minigpt4.export import export_transformers

    folder = Path(spec.workdir or scratch) / f"transformers-{spec.dims}-{model.llm.config.hidden_size}-seed{spec.seed}"
    if not (folder / "config.json").is_file():
        export_transformers(model, folder, overwrite=True)
    model.to("meta")  # free our copy of the weights
    reset_peak_memory(torch.device(spec.device))
    blip2 = Blip2ForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa" if spec.switches.sdpa else "eager").to(spec.device)
    blip2.requires_grad_(False)
    blip2.eval()  # frozen parts without dropout, as the original keeps them
    blip2.language_projection.requires_grad_(True)
    input_ids = layout.input_ids.masked_fill(layout.image_mask, blip2.config.image_token_index)

    def loss_fn() -> torch.Tensor:
        return blip2(pixel_values=pixels, input_ids=input_ids, attention_mask=layout.attention_mask,
                     labels=layout.labels).loss

    return loss_fn, list(blip2.language_projection.parameters())


# ------------------------------------------------------------------------------------ chat


def decode_without_cache(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy decoding in its plainest form: every step runs the LLM over the whole sequence.

    (transformers' `generate(use_cache=False)` still keeps a cache in transformers 5, so the baseline
    is written out here.) Returns the (B, tokens) new ids.
    """
    embed = llm.get_input_embeddings()
    new_ids = []
    for _ in range(tokens):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        logits = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                     use_cache=False).logits[:, -1]  # (B, V)
        next_id = logits.argmax(dim=-1)  # (B,)
        new_ids.append(next_id)
        inputs_embeds = torch.cat([inputs_embeds, embed(next_id)[:, None]], dim=1)  # (B, L+1, H)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_id), 1)], dim=1)
    return torch.stack(new_ids, dim=1)


def run_chat(spec: Spec, model, scratch: Path) -> dict:
    """Time to first token (image encoding + prefill) and decode tokens/s through minigpt4.chat."""
    from transformers import GenerationConfig

    from minigpt4.chat.generation import encode_images, prepare_inputs
    from minigpt4.chat.templates import Message, get_template
    from minigpt4.data.synthetic import draw_scene
    from minigpt4.processing.image import eval_transform
    from minigpt4.processing.prompt import pad_token_id

    sw = spec.switches
    device = model.device
    size = model.config.vision.image_size
    image = eval_transform(size)(draw_scene(spec.seed, size=size)[0])
    question = Message("user", "Describe this image in detail.", images=1)
    prompt = get_template("vicuna_v0", model.tokenizer).render([question])
    prompts, images = [prompt] * sw.gen_batch, [[image]] * sw.gen_batch

    def decode(prepared, tokens: int) -> torch.Tensor:
        # A fixed answer length (min = max), so every variant decodes the same number of tokens.
        if not sw.kv_cache:
            return decode_without_cache(model.llm, prepared.inputs_embeds, prepared.attention_mask, tokens)
        config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                                  pad_token_id=pad_token_id(model.tokenizer), eos_token_id=model.tokenizer.eos_token_id)
        return model.llm.generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                                  generation_config=config)

    def first_token():
        prepared = prepare_inputs(model, prompts, encode_images(model, images))
        decode(prepared, 1)
        return prepared

    with torch.inference_mode():
        for _ in range(spec.warmup):
            decode(first_token(), 2)
        setup_peak = reset_peak_memory(device)
        ttfts, prefills, fulls = [], [], []
        for _ in range(spec.steps):
            prepared, ttft = timed(device, first_token)
            _, prefill = timed(device, lambda prepared=prepared: decode(prepared, 1))
            _, full = timed(device, lambda prepared=prepared: decode(prepared, spec.new_tokens))
            ttfts.append(ttft)
            prefills.append(prefill)
            fulls.append(full)
    ttft = sum(ttfts) / len(ttfts)
    # The N-1 tokens after the first, best-of on both sides (other processes only ever slow a run down). At tiny
    # dims on a busy machine the difference can drown in noise: then there is no decode rate to report.
    decode_s = min(fulls) - min(prefills)
    rows = sw.gen_batch
    return {
        "prompt_tokens": prepared.prompt_tokens[0],
        "new_tokens": spec.new_tokens,
        "ttft_s": ttft,
        "prefill_s": sum(prefills) / len(prefills),
        "decode_tok_s": rows * (spec.new_tokens - 1) / decode_s if decode_s > 0 else None,  # all rows together
        "answer_s": ttft + max(decode_s, 0.0),
        "peak_memory_gib": peak_memory_gib(device),
        "peak_setup_gib": setup_peak,
    }


# ------------------------------------------------------------------------------------ main


def execute(spec: Spec) -> dict:
    """Build the spec's model, run its measurement, return the figures."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-", dir=spec.workdir or None) as scratch:
        model, build_s = timed(torch.device(spec.device), lambda: build(spec))
        runner = run_train if spec.task == "train" else run_chat
        result = runner(spec, model, Path(scratch))
    result.update(build_s=build_s, threads=torch.get_num_threads())
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.worker '<Spec JSON>'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("minigpt4.model.build").setLevel(logging.ERROR)  # "towers are RANDOM" is the point here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = execute(Spec.from_json(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
