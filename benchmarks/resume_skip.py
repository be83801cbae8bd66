"""Resume fast-forward time: how long a stage-1 stream takes to hand out its first batch after skipping N samples.

    python -m benchmarks.resume_skip [--samples 100000] [--runs 3]

Builds img2dataset-style shards of tiny JPEG + caption samples in a temporary folder (every sample decodes, so the
stream's position after N samples is N), then opens `stage1_batches` at batch N / batch_size the way a resumed
training run does and times `next()`. Prints the machine, the run count and min/median/max seconds. Code that
records stream positions in checkpoints gets the position (`positions=`); older code only takes `start_batch`.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import platform
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image


def tiny_jpeg(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 40)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def build_shards(folder: Path, samples: int, per_shard: int, image_size: int) -> str:
    jpeg = tiny_jpeg(image_size)
    shards = (samples + per_shard - 1) // per_shard
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                key = f"{index:09d}"
                add_member(archive, f"{key}.jpg", jpeg)
                add_member(archive, f"{key}.txt", f"a small orange square number {index}".encode())
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def time_resume(pattern: str, skip: int, batch_size: int, image_size: int) -> float:
    from minigpt4.data.webdataset import stage1_batches
    from minigpt4.processing.image import eval_transform

    options = dict(seed=0, shuffle_buffer=1000, num_workers=0, start_batch=skip // batch_size)
    if "positions" in inspect.signature(stage1_batches).parameters:
        options["positions"] = {"0/0/1": skip}  # what the checkpoint records: source 0, slot 0 of 1
    start = time.perf_counter()
    batch = next(stage1_batches([(pattern, 1.0)], eval_transform(image_size), batch_size, **options))
    seconds = time.perf_counter() - start
    assert len(batch["key"]) == batch_size
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples skipped (default 100000)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=32, help="pixels per side of every JPEG (default 32)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.samples % args.batch_size:
        parser.error("--samples must be a multiple of --batch-size")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}; commit {commit}")
    with tempfile.TemporaryDirectory() as tmp:
        # The pass holds more than the skipped samples plus the shuffle buffer, so the resume lands inside pass 0.
        total = args.samples + 2 * 1000 + args.batch_size
        start = time.perf_counter()
        pattern = build_shards(Path(tmp), total, args.per_shard, args.image_size)
        print(f"built {total} samples in {time.perf_counter() - start:.1f} s")
        times = [time_resume(pattern, args.samples, args.batch_size, args.image_size) for _ in range(args.runs)]
    print("runs: " + ", ".join(f"{t:.2f}" for t in times))
    print(f"resume after {args.samples} skipped samples, {args.runs} runs: min {min(times):.2f} s, "
          f"median {statistics.median(times):.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    main()
