"""Training data the project makes itself: drawn shapes with known content, plus real photos.

Every generated image holds 1-3 filled shapes of one colour on a plain light background. What was
drawn (colour, shape, count, position, background) is known exactly, so captions are true by
construction and a model's description can be scored by parsing it (`minigpt4.eval_shapes`).

Written layouts:
- stage 1: webdataset shards as img2dataset writes them (`{key}.jpg`, `{key}.json` with a
  "caption", `{key}.txt`), read by `minigpt4.data.webdataset.stage1_batches`;
- stage 2: a cc_sbu_align-style folder (`filter_cap.json` + `image/{image_id}.jpg`) with longer
  descriptions, read by `minigpt4.data.aligned.stage2_batches`;
- two evaluation splits of new single-shape images, never used for training: `validation/validation.json`
  (for choosing learning rates and step counts) and `test/test.json` (for the scores we report).

The real photos that ship inside scikit-image get captions written here by hand.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 45, 170),
    "orange": (245, 125, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (212, 212, 212),
    "cream": (245, 235, 200),
    "pale blue": (208, 226, 245),
    "pale green": (212, 240, 212),
    "pale pink": (245, 218, 226),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# 3x3 grid of where a single shape's centre lies.
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


@dataclass
class Scene:
    """What one generated image shows."""

    colour: str
    shape: str
    count: int
    position: str  # "top left", "centre", ...; "scattered" when count > 1
    background: str
    seed: int

    def caption(self) -> str:
        """The short stage-1 caption, e.g. "a red circle" or "two blue stars"."""
        if self.count == 1:
            return f"a {self.colour} {self.shape}"
        return f"{COUNT_WORDS[self.count]} {self.colour} {PLURALS[self.shape]}"

    def description(self) -> str:
        """The longer stage-2 description; it starts with the caption so both stages agree."""
        if self.count == 1:
            where = "in the centre" if self.position == "centre" else f"in the {self.position}"
            where += " of the image"
            first = f"A {self.colour} {self.shape} {where}"
        else:
            first = f"{COUNT_WORDS[self.count].capitalize()} {self.colour} {PLURALS[self.shape]} spread over the image"
        return f"{first}, on a plain {self.background} background."


def _position_word(cx: float, cy: float, size: int) -> str:
    row = _ROWS[min(2, int(3 * cy / size))]
    col = _COLS[min(2, int(3 * cx / size))]
    if row == "middle" and col == "centre":
        return "centre"
    if row == "middle":
        return col
    if col == "centre":
        return row
    return f"{row} {col}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Corner points of the polygonal shapes, rotated by `angle` radians."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def draw_scene(
    seed: int,
    size: int = 224,
    count_weights: tuple[float, float, float] = (0.8, 0.12, 0.08),
    colour: str | None = None,
    shape: str | None = None,
) -> tuple[Image.Image, Scene]:
    """Draw one image from `seed` (the same seed always gives the same image and scene)."""
    rng = random.Random(seed)
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    count = rng.choices((1, 2, 3), weights=count_weights)[0]
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[background], rng, 8))
    draw = ImageDraw.Draw(image)
    fill = _jitter(COLOURS[colour], rng, 20)
    # Big shapes when alone, smaller when several share the image; centres keep the shape inside.
    lo, hi = (0.10, 0.30) if count == 1 else (0.08, 0.15)
    centres: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(50):
            r = rng.uniform(lo, hi) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 4 for x, y, q in centres):
                break
        centres.append((cx, cy, r))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            angle = rng.uniform(-0.25, 0.25) if shape in ("triangle", "star", "square") else 0.0
            draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    position = _position_word(centres[0][0], centres[0][1], size) if count == 1 else "scattered"
    return image, Scene(colour, shape, count, position, background, seed)


# Real photos that ship inside the scikit-image wheel (no download), with captions written here.
SKIMAGE_PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": (
        "a ginger tabby cat",
        "A ginger tabby cat sits on a light surface and looks to the side, its whiskers spread out.",
    ),
    "coffee": (
        "a cup of coffee on a saucer",
        "A white cup of black coffee stands on a white saucer with a spoon, seen from above on a table.",
    ),
    "astronaut": (
        "an astronaut in an orange suit",
        "A smiling astronaut in an orange launch suit poses in front of an American flag.",
    ),
    "rocket": (
        "a rocket lifting off",
        "A white rocket lifts off from its launch pad, trailing bright flames and a cloud of smoke.",
    ),
    "stereo_motorcycle": (
        "a red motorcycle in a workshop",
        "A red motorcycle stands indoors next to a wall with tools and boxes around it.",
    ),
    "hubble_deep_field": (
        "galaxies in deep space",
        "Hundreds of small galaxies of many colours glow against the black background of deep space.",
    ),
}


def skimage_photos() -> list[tuple[str, Image.Image, str, str]]:
    """(name, image, caption, description) for each real scikit-image photo above."""
    import skimage.data

    photos = []
    for name, (caption, description) in SKIMAGE_PHOTOS.items():
        array = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            array = array[0]  # a (left, right, disparity) triple: keep the left view
        photos.append((name, Image.fromarray(array).convert("RGB"), caption, description))
    return photos


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@dataclass
class SyntheticData:
    """Where `generate` wrote everything."""

    root: Path
    stage1_shards: str  # brace pattern for stage1_batches, e.g. root/stage1/{00000..00003}.tar
    stage2_root: Path  # cc_sbu_align-style folder
    validation: Path  # validation.json (list of scenes with their image paths): for choosing settings
    test: Path  # test.json, same layout: for reporting, never looked at while choosing
    num_stage1: int
    num_stage2: int
    num_validation: int
    num_test: int


def write_stage1(root: Path, items: list[tuple[str, Image.Image, str]], shard_size: int = 1000) -> str:
    """Write (key, image, caption) items as img2dataset-style webdataset shards; returns the pattern."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, math.ceil(len(items) / shard_size))
    for shard in range(num_shards):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for key, image, caption in items[shard * shard_size : (shard + 1) * shard_size]:
                meta = {"caption": caption, "key": key, "status": "success",
                        "width": image.width, "height": image.height}
                sink.write({"__key__": key, "jpg": _jpeg(image), "json": json.dumps(meta).encode(),
                            "txt": caption.encode()})
    last = num_shards - 1
    return str(root / ("00000.tar" if last == 0 else f"{{00000..{last:05d}}}.tar"))


def write_stage2(root: Path, items: list[tuple[str, Image.Image, str]]) -> None:
    """Write (image_id, image, description) items as a cc_sbu_align folder."""
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations = []
    for image_id, image, description in items:
        (root / "image" / f"{image_id}.jpg").write_bytes(_jpeg(image))
        annotations.append({"image_id": image_id, "caption": description})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}, indent=1))


# Each split draws its scenes from its own seed range (offset from the run's base), so the splits are disjoint.
# The validation range is the one the earlier single "held-out" split used, on which the quickstart's settings
# were chosen; the test range was added afterwards and never used to choose anything.
SPLIT_SEED_OFFSETS = {"stage1": 0, "stage2": 3_000_000, "validation": 6_000_000, "test": 7_000_000}


def write_eval_split(root: Path, name: str, first_seed: int, count: int) -> Path:
    """Draw `count` single-shape scenes from seeds `first_seed...` into `root/{name}.json` + images."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        image, scene = draw_scene(first_seed + i, count_weights=(1.0, 0.0, 0.0))
        path = root / f"{name}{i:04d}.jpg"
        path.write_bytes(_jpeg(image))
        records.append({"image": path.name, **asdict(scene)})
    index = root / f"{name}.json"
    index.write_text(json.dumps(records, indent=1))
    return index


def generate(
    root: str | Path,
    num_stage1: int = 4800,
    num_stage2: int = 600,
    num_validation: int = 100,
    num_test: int = 100,
    seed: int = 0,
    include_photos: bool = True,
) -> SyntheticData:
    """Generate the stage-1 shards, the stage-2 folder and the validation and test splits under `root`.

    The splits use disjoint seed ranges (`SPLIT_SEED_OFFSETS`), so no evaluation image is ever trained on.
    Evaluation images hold a single shape (their colour and shape are what the evaluation scores).
    """
    root = Path(root)
    base = seed * 10_000_000
    stage1: list[tuple[str, Image.Image, str]] = []
    for i in range(num_stage1):
        image, scene = draw_scene(base + SPLIT_SEED_OFFSETS["stage1"] + i)
        stage1.append((f"{i:09d}", image, scene.caption()))
    stage2: list[tuple[str, Image.Image, str]] = []
    for i in range(num_stage2):
        image, scene = draw_scene(base + SPLIT_SEED_OFFSETS["stage2"] + i)
        stage2.append((f"shape{i}", image, scene.description()))
    if include_photos:
        for name, image, caption, description in skimage_photos():
            stage1.append((f"photo_{name}", image, caption))
            stage2.append((f"photo_{name}", image, description))
    # Interleave the photos with the shapes rather than leaving them all in the last shard.
    random.Random(seed).shuffle(stage1)
    pattern = write_stage1(root / "stage1", stage1)
    write_stage2(root / "stage2", stage2)
    validation = write_eval_split(root / "validation", "validation", base + SPLIT_SEED_OFFSETS["validation"],
                                  num_validation)
    test = write_eval_split(root / "test", "test", base + SPLIT_SEED_OFFSETS["test"], num_test)
    return SyntheticData(root, pattern, root / "stage2", validation, test, len(stage1), len(stage2), num_validation,
                         num_test)
