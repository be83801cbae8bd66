"""Tiny training data built once per session: webdataset shards and a cc_sbu_align folder of drawn shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from minigpt4.data.synthetic import draw_scene, write_stage1, write_stage2

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64  # stored pixels; the tiny configs train at model.vision.image_size=56


@dataclass
class TinyData:
    shards: str  # 2 shards x 16 samples
    one_shard: str  # 1 shard x 32 samples
    aligned: Path  # 24 image-description pairs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    root = tmp_path_factory.mktemp("train_data")
    scenes = [draw_scene(seed, size=IMAGE_SIZE) for seed in range(32)]
    captions = [(f"{i:05d}", image, scene.caption()) for i, (image, scene) in enumerate(scenes)]
    shards = write_stage1(root / "shards", captions, shard_size=16)
    one_shard = write_stage1(root / "one_shard", captions, shard_size=32)
    descriptions = [(str(i), image, scene.description()) for i, (image, scene) in enumerate(scenes[:24])]
    write_stage2(root / "aligned", descriptions)
    return TinyData(shards, one_shard, root / "aligned")


def overrides(llm: Path, output_dir: Path, datasets: list[dict], *extra: str) -> list[str]:
    """key=value overrides pointing a tiny config at test data."""
    return [f"model.llm.path={llm}", f"train.output_dir={output_dir}", f"data.datasets={json.dumps(datasets)}",
            *extra]


def cli_env() -> dict[str, str]:
    """One thread per process: the machine has 2 cores, and results must not depend on thread counts."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli_command(config: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "minigpt4.cli", "train", str(REPO / "configs" / config), *args]


def run_cli(config: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_command(config, args), env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_log(output_dir: Path) -> dict[int, dict]:
    """step -> the LAST record logged for it (a resumed run logs the steps after its checkpoint again)."""
    records = [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}
