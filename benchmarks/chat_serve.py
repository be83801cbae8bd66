"""Chat and serve speed against what a user would otherwise run: transformers' `generate`, one request at a time.

    python -m benchmarks.chat_serve                                  # every part, 3 runs each
    python -m benchmarks.chat_serve --parts chat --runs 5 --new-tokens 64
    python -m benchmarks.chat_serve --output benchmarks/results/chat-serve-cpu.md

Parts (the embedded MiniGPT-4: EfficientNet-Lite0 + Q-Former + SmolLM2-135M-Instruct with its real weights;
the Q-Former and projection are random without a quickstart checkpoint, which changes no shape or FLOP):
  chat      time to first token and decode tokens/s at batch 1 and 8, greedy, the chat template's stop strings.
            ours: `minigpt4.chat.generation.stream_batch` (what `minigpt4 chat` and `serve` run).
            LLM: the rendered prompts as token ids into transformers' `AutoModelForCausalLM.generate` (KV cache,
            the same stop strings), against ours on text-only prompts.
            MiniGPT-4 + image: our towers encode the image, then `generate(inputs_embeds=...)` on the same LLM
            (the embedded EfficientNet tower cannot be exported to `Blip2ForConditionalGeneration`).
  serve     requests/s and p50/p95 latency of `minigpt4 serve --preset embedded` (uvicorn on 127.0.0.1) under
            concurrent OpenAI-client requests (threads of this process) with an image and mixed max_tokens,
            batched (--max-batch-size 8) against one at a time (--max-batch-size 1).
  stream    the streamed-text path alone (`_RowText`), microseconds per token and tokens decoded per answer.
  profile   one chat turn under torch.profiler: time by op (self CPU), matmuls apart, and time outside every op.

Every figure is min / median / max over --runs runs; the fp32 and bf16 matmul peaks (benchmarks.peak) are
measured in the same invocation. Decode MFU = the decode steps' matmul/attention FLOPs (torch's FlopCounterMode:
an N-token call minus a 1-token call) per second of decoding, over the matmul peak in the model's dtype.
Run with PYTHONPATH pointing at another checkout's `src` to measure that version (say so with --label).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.peak import matmul_peak

PARTS = ("chat", "serve", "stream", "profile")
QUESTIONS = [
    "Describe this picture in detail.",
    "Write a long story about a cat and a dog who travel the world together.",
    "What could happen next in this scene? Explain step by step.",
    "List every object you can see and say what each one is used for.",
    "Write a poem about the colours of autumn.",
    "Explain how a camera turns light into a photo.",
    "Tell me about the animal in the image: where it lives, what it eats and how it sleeps.",
    "Why is the sky blue? Answer for a ten year old.",
]
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
              "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """min / median / max."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


# ------------------------------------------------------------------------------------ model and inputs


def build_embedded():
    from minigpt4.config import model_config
    from minigpt4.model.build import build_model

    torch.manual_seed(0)
    model = build_model(model_config("embedded"))
    model.eval().requires_grad_(False)  # inference only (FlopCounterMode's module hooks trip over trainable ones)
    return model


def photo_pixels(model) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    from minigpt4.processing.image import eval_transform

    return eval_transform(model.config.vision.image_size)(Image.fromarray(data.chelsea()))


def prompts(model, batch: int, images: int):
    from minigpt4.chat.templates import Message, get_template

    talk = model.chat_defaults
    template = get_template(talk.template, model.tokenizer)
    rendered = [template.render([Message(role="user", text=QUESTIONS[i % len(QUESTIONS)], images=images)],
                                talk.system) for i in range(batch)]
    return template, rendered


class StepClock:
    """Wall time of every decoding step, as a transformers streamer sees them (the first put is the prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.steps.append(time.perf_counter())

    def end(self) -> None:
        pass


def timing(clock: StepClock, finished: float, tokens: int, batch: int) -> dict:
    """TTFT: call start to the first new token; decode tokens/s: the generated tokens after the first
    token of each row, over the time after the first step."""
    first = clock.steps[0] - clock.start
    decode_s = finished - clock.steps[0]
    return {"ttft_s": first, "decode_tok_s": (tokens - batch) / decode_s if decode_s > 0 else float("nan"),
            "total_s": finished - clock.start}


def run_ours(model, rendered, pixels, template, new_tokens: int) -> tuple[dict, list[str]]:
    from minigpt4.chat import generation

    clock = StepClock()
    original = generation._RowsStreamer.put

    def put(self, value):  # benchmark instrumentation: one timestamp per step
        clock.put(value)
        return original(self, value)

    settings = generation.GenerationSettings(do_sample=False, max_new_tokens=new_tokens)
    images = [[pixels] if pixels is not None else [] for _ in rendered]
    generation._RowsStreamer.put = put
    try:
        clock.start = time.perf_counter()
        done = generation.stream_batch(model, rendered, images, settings, lambda row, text: None,
                                       template_stops=template.stop, add_bos=template.add_bos)
        finished = time.perf_counter()
    finally:
        generation._RowsStreamer.put = original
    tokens = sum(c.completion_tokens for c in done)
    return timing(clock, finished, tokens, len(rendered)) | {"tokens": tokens}, [c.text for c in done]


def hf_inputs(model, rendered, pixels, template):
    """What a transformers user feeds `generate`: the prompts' token ids, left-padded (text), or our towers'
    embeddings written into the prompts (image). The same ids either way as `minigpt4.chat` lays out."""
    from minigpt4.chat.generation import encode_images, prepare_inputs
    from minigpt4.processing.prompt import collate_layouts, layout_sample, pad_token_id

    if pixels is None:
        samples = [layout_sample(model.tokenizer, prompt, 0, add_bos=template.add_bos) for prompt in rendered]
        batch = collate_layouts(samples, pad_token_id(model.tokenizer), padding_side="left")
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    embeds = encode_images(model, [[pixels]] * len(rendered))
    prepared = prepare_inputs(model, rendered, embeds, template.add_bos)
    return {"inputs_embeds": prepared.inputs_embeds, "attention_mask": prepared.attention_mask}


@functools.lru_cache(maxsize=4)
def stop_criteria(tokenizer, stops: tuple[str, ...]):
    """Built once, as a careful transformers user would: `generate(stop_strings=...)` scans the whole
    vocabulary again on every call (~0.3 s for SmolLM2's 49k tokens)."""
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    return StoppingCriteriaList([StopStringCriteria(tokenizer, list(stops))])


def run_transformers(model, rendered, pixels, template, new_tokens: int) -> tuple[dict, list[str]]:
    from minigpt4.chat.generation import finish, stop_token_ids
    from minigpt4.processing.prompt import pad_token_id

    clock = StepClock()
    criteria = stop_criteria(model.tokenizer, tuple(template.stop))
    with torch.inference_mode():
        clock.start = time.perf_counter()
        inputs = hf_inputs(model, rendered, pixels, template)  # image encoding counts toward TTFT
        out = model.llm.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock,
                                 stopping_criteria=criteria, pad_token_id=pad_token_id(model.tokenizer))
        finished = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out
    texts, tokens = [], 0
    for ids in new.tolist():
        text, count, _ = finish(model.tokenizer, ids, list(template.stop), stop_token_ids(model.tokenizer, []))
        texts.append(text)
        tokens += count
    return timing(clock, finished, tokens, len(rendered)) | {"tokens": tokens}, texts


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def part_chat(args, model, peaks) -> list[str]:
    pixels = photo_pixels(model)
    dtype = next(model.llm.parameters()).dtype
    peak = peaks[str(dtype).removeprefix("torch.")]
    lines = [
        "| input | batch | runner | TTFT s | decode tok/s | whole call s | decode MFU % | tokens "
        "| same text as transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, image in (("SmolLM2-135M, text", None), ("MiniGPT-4 + image", pixels)):
        for batch in args.batches:
            template, rendered = prompts(model, batch, 1 if image is not None else 0)
            runners = {"transformers generate": run_transformers, "ours (stream_batch)": run_ours}
            whole, first = (count_flops(functools.partial(run_transformers, model, rendered, image, template, tokens))
                            for tokens in (args.new_tokens, 1))
            results: dict[str, list[dict]] = {name: [] for name in runners}
            texts: dict[str, list[str]] = {}
            for _ in range(args.runs):  # interleaved, so load changes hit both alike (the FLOP counts warmed up)
                for name, runner in runners.items():
                    result, texts[name] = runner(model, rendered, image, template, args.new_tokens)
                    results[name].append(result)
            same = texts["ours (stream_batch)"] == texts["transformers generate"]
            for name, runs in results.items():
                mfu = [100 * (whole - first) / (r["total_s"] - r["ttft_s"]) / peak for r in runs]
                tokens = sorted({r["tokens"] for r in runs})
                lines.append(
                    f"| {label} | {batch} | {name} | {spread([r['ttft_s'] for r in runs], '{:.3f}')} | "
                    f"{spread([r['decode_tok_s'] for r in runs], '{:.1f}')} | {spread([r['total_s'] for r in runs])} "
                    f"| {spread(mfu, '{:.1f}')} | {'/'.join(map(str, tokens))} | "
                    f"{'' if name.startswith('transformers') else 'yes' if same else 'NO'} |"
                )
            print(lines[-2], lines[-1], sep="\n", flush=True)
    return lines


# ------------------------------------------------------------------------------------ serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def photo_data_url() -> str:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((224, 224)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(max_batch: int, threads: int, src: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if src is not None:  # another checkout's minigpt4
        env["PYTHONPATH"] = src
    command = [sys.executable, "-m", "minigpt4.cli", "serve", "--preset", "embedded", "--port", str(port),
               "--max-batch-size", str(max_batch), "--max-n", "1", "--max-queue", "256"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"minigpt4 serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("minigpt4 serve did not come up in 300 s")


def load(url: str, requests: int, concurrency: int, max_tokens: list[int], image: str) -> dict:
    """`requests` chat completions from `concurrency` threads, each with its own OpenAI client."""
    import openai

    latencies: list[float] = []
    completion_tokens: list[int] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                index = todo.pop(0)
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model="minigpt4", temperature=0, max_tokens=max_tokens[index % len(max_tokens)],
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]}],
            )
            with lock:
                latencies.append(time.perf_counter() - start)
                completion_tokens.append(reply.usage.completion_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if len(latencies) != requests:
        raise RuntimeError(f"{requests - len(latencies)} requests failed")
    ordered = sorted(latencies)
    return {"rps": requests / wall, "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "tok_s": sum(completion_tokens) / wall, "tokens": sum(completion_tokens), "wall": wall}


def part_serve(args) -> list[str]:
    image = photo_data_url()
    lines = [
        f"{args.requests} requests per run from {args.concurrency} client threads, max_tokens cycling "
        f"{args.max_tokens}, temperature 0, one 224x224 PNG each; server OMP_NUM_THREADS={args.threads}. "
        "All servers run side by side (idle while another is measured) and the runs are interleaved.",
        "",
        "| server | scheduling | requests/s | p50 latency s | p95 latency s | completion tokens/s "
        "| completion tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    setups = [("this checkout", None, max_batch) for max_batch in args.schedules]
    if args.before_src:
        setups += [(args.before_name, args.before_src, max_batch) for max_batch in args.before_schedules]
    servers = []
    try:
        for _, src, max_batch in setups:
            servers.append(start_server(max_batch, args.threads, src))
        for _, url in servers:
            load(url, 2, 2, args.max_tokens, image)  # warm-up
        runs: list[list[dict]] = [[] for _ in setups]
        for _ in range(args.runs):
            for index, (_, url) in enumerate(servers):
                runs[index].append(load(url, args.requests, args.concurrency, args.max_tokens, image))
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(30)
    for (who, _, max_batch), results in zip(setups, runs, strict=True):
        label = "one at a time (--max-batch-size 1)" if max_batch == 1 else f"batched (--max-batch-size {max_batch})"
        lines.append(f"| {who} | {label} | {spread([r['rps'] for r in results])} | "
                     f"{spread([r['p50'] for r in results])} | {spread([r['p95'] for r in results])} | "
                     f"{spread([r['tok_s'] for r in results], '{:.1f}')} | "
                     f"{'/'.join(str(t) for t in sorted({r['tokens'] for r in results}))} |")
        print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------------ streamed text, profile


def part_stream(args, model) -> list[str]:
    """Feed a real answer's ids to the streamed-text path; µs per token and ids decoded per answer."""
    import inspect

    from minigpt4.chat import generation

    tokenizer = model.tokenizer
    text = "The cat 猫 sits on the mat 😀 and looks at the bird. " * 200
    words = tokenizer.encode(text, add_special_tokens=False)
    decoded = [0]
    original = type(tokenizer).decode

    def counting(self, ids, **kwargs):
        decoded[0] += len(ids)
        return original(self, ids, **kwargs)

    lines = ["| answer tokens | µs per token | ids decoded by tokenizer.decode per answer |", "|---|---|---|"]
    for length in args.stream_lengths:
        ids = words[:length]
        limits = generation.RowLimits(("###",), (tokenizer.eos_token_id,), length + 1)
        old = len(inspect.signature(generation._RowText).parameters) > 2  # before: (tokenizer, limits, byte_ids)
        extra = (generation._byte_token_ids(tokenizer),) if old else ()
        times = []
        for _ in range(args.runs):
            decoded[0] = 0
            type(tokenizer).decode = counting
            try:
                row = generation._RowText(tokenizer, limits, *extra)
                start = time.perf_counter()
                for token_id in ids:
                    row.add(token_id)
                row.close(0)
                times.append((time.perf_counter() - start) / length * 1e6)
            finally:
                type(tokenizer).decode = original
        lines.append(f"| {length} | {spread(times, '{:.1f}')} | {decoded[0]} |")
        print(lines[-1], flush=True)
    return lines


def part_profile(args, model) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    pixels = photo_pixels(model)
    template, rendered = prompts(model, 1, 1)
    run_ours(model, rendered, pixels, template, args.new_tokens)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_ours(model, rendered, pixels, template, args.new_tokens)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    op_total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)
    lines = [
        f"One chat turn, batch 1, image + {args.new_tokens} greedy tokens: wall {wall:.2f} s under the profiler; "
        f"matmuls/attention/convolutions {matmul:.2f} s ({100 * matmul / wall:.0f}%).",
        "",
        "| cost outside the matmuls | self CPU s | % of the turn | calls |",
        "|---|---|---|---|",
        f"| outside every torch op (Python: transformers' layers, generate's loop, our streamer) | "
        f"{wall - op_total:.2f} | {100 * (wall - op_total) / wall:.1f} | |",
    ]
    for event in others[:8]:
        seconds = event.self_cpu_time_total / 1e6
        lines.append(f"| `{event.key}` | {seconds:.3f} | {100 * seconds / wall:.1f} | {event.count} |")
    print("\n".join(lines), flush=True)
    return lines


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chat_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="chat/profile: greedy tokens per answer")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (here and in the server)")
    parser.add_argument("--requests", type=int, default=12, help="serve: requests per run")
    parser.add_argument("--concurrency", type=int, default=8, help="serve: client threads")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4, 8, 16, 24], help="serve: cycled max_tokens")
    parser.add_argument("--schedules", type=int, nargs="+", default=[8, 1], help="serve: --max-batch-size values")
    parser.add_argument("--before-src", default=None, help="serve: also run servers from this `src` folder")
    parser.add_argument("--before-name", default="before", help="serve: what to call that checkout in the table")
    parser.add_argument("--before-schedules", type=int, nargs="+", default=[8], help="serve: their --max-batch-size")
    parser.add_argument("--stream-lengths", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--label", default="", help="a note for the header (e.g. 'before': another checkout)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import minigpt4

    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16, repeats=3)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    header = [
        f"# Chat and serve{' — ' + args.label if args.label else ''}",
        "",
        f"`python -m benchmarks.chat_serve {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__} with {args.threads} "
        f"thread(s); minigpt4 from {Path(minigpt4.__file__).parent}. Matmul peak measured in this run: fp32 "
        f"{peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s. Figures: min / median / "
        f"max of {args.runs} runs.",
        "",
    ]
    print("\n".join(header), flush=True)
    sections = []
    model = build_embedded() if set(args.parts) - {"serve"} else None
    for part in args.parts:
        title = {"chat": "Chat: time to first token and decode speed", "serve": "Serve: the real server under load",
                 "stream": "Streamed text path", "profile": "Where a chat turn's time goes"}[part]
        print(f"## {title}", flush=True)
        if part == "chat":
            body = part_chat(args, model, peaks)
        elif part == "serve":
            body = part_serve(args)
        elif part == "stream":
            body = part_stream(args, model)
        else:
            body = part_profile(args, model)
        sections += [f"## {title}", "", *body, ""]
    peaks_after = matmul_peak(torch.float32)
    footer = [f"fp32 matmul peak again at the end: {peaks_after / 1e9:.1f} GFLOP/s."]
    if args.output is not None:
        args.output.write_text("\n".join(header + sections + footer) + "\n")
    print(footer[0])
    print(json.dumps({"peaks_gflops": {k: v / 1e9 for k, v in peaks.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
