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
from collections.abc import Sequence
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


# ------------------------------------------------------------------------------------ the instruction set

# Colour-shape pairs never drawn for training (one per colour and one per shape): the "unseen pairs" test row
# asks whether the model names a colour and a shape it knows in a combination it never saw.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, SHAPES[(index + 2) % len(SHAPES)]) for index, colour in enumerate(COLOURS)
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
# What `minigpt4 eval` asks by default (its captioning request, and LLaVA-1.5's short-answer suffix); the
# instruction set uses both, so the quickstart model answers the eval prompts in the style they ask for.
SHORT_ANSWER_SUFFIX = " Answer the question using a single word or phrase."
CAPTION_REQUEST = "Briefly describe this image in one sentence."
DESCRIBE_REQUESTS = ("Describe this image.", "What do you see?", CAPTION_REQUEST)
QUESTION_KINDS = ("describe", "colour", "shape", "count", "position", "yes_no")
# How often a yes/no probe is drawn, relative to each other kind. Leaving the probes out did not make them answerable
# nor the rest clearly better on the validation split (`python -m benchmarks.quickstart_stage2`), so they keep an
# equal share.
PROBE_WEIGHT = 1.0
POPE_SETTINGS = ("random", "popular", "adversarial")


def draw_pair_scene(seed: int, pairs: Sequence[tuple[str, str]], count_weights: tuple[float, float, float]
                    = (0.8, 0.12, 0.08)) -> tuple[Image.Image, Scene]:
    """`draw_scene(seed)` with its colour and shape drawn from `pairs` (from the same seed)."""
    colour, shape = random.Random(f"pair:{seed}").choice(pairs)
    return draw_scene(seed, count_weights=count_weights, colour=colour, shape=shape)


def object_name(colour: str, shape: str) -> str:
    """What a POPE-style probe asks about: "red circle"."""
    return f"{colour} {shape}"


def absent_object(scene: Scene, setting: str, rng: random.Random, popular: Sequence[tuple[str, str]]) -> str:
    """An object the image does not show, sampled as POPE does: `random` (any other colour-shape pair),
    `popular` (one of the pairs most frequent in the training images) or `adversarial` (the closest confusion:
    the same colour with another shape, or the same shape in another colour)."""
    present = (scene.colour, scene.shape)
    if setting == "random":
        pool = [p for p in ALL_PAIRS if p != present]
    elif setting == "popular":
        pool = [p for p in popular if p != present]
    elif setting == "adversarial":
        pool = [(scene.colour, s) for s in SHAPES if s != scene.shape] + \
               [(c, scene.shape) for c in COLOURS if c != scene.colour]
    else:
        raise ValueError(f"unknown POPE setting {setting!r}; known: {', '.join(POPE_SETTINGS)}")
    return object_name(*rng.choice(pool))


def article(name: str) -> str:
    """ "a red circle", "an orange star"."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def pope_question(name: str) -> str:
    """POPE's question wording ("Is there a ... in the image?")."""
    return f"Is there {article(name)} in the image?"


def short_answers(scene: Scene) -> dict[str, str]:
    """The one-word (or phrase) answer to each short question about `scene`, as VQA annotators would write it."""
    answers = {"colour": scene.colour, "shape": scene.shape, "count": str(scene.count)}
    if scene.count == 1:
        answers["position"] = scene.position
    return answers


def ask(scene: Scene, kind: str, rng: random.Random, popular: Sequence[tuple[str, str]], short: bool
        ) -> tuple[str, str]:
    """One (question, answer) of `kind` about `scene`. `short` asks for a single word or phrase (with the eval
    prompts' suffix); otherwise the answer is a short sentence."""
    one = scene.count == 1
    thing, things = ("the shape", "shape is") if one else ("the shapes", "shapes are")
    if kind == "describe":
        return rng.choice(DESCRIBE_REQUESTS), scene.description()
    if kind == "colour":
        question = rng.choice((f"What colour is {thing}?", f"What colour {'is' if one else 'are'} {thing}?",
                               "What is the colour of the shape?" if one else "What colour are the shapes?"))
        sentence = f"The {things} {scene.colour}."
        answer = scene.colour
    elif kind == "shape":
        question = rng.choice(("What shape is in the image?", "What shape is this?", "Which shape do you see?"))
        sentence = f"It is a {scene.shape}." if one else f"They are {PLURALS[scene.shape]}."
        answer = scene.shape
    elif kind == "count":
        question = rng.choice(("How many shapes are there?", "How many shapes are in the image?"))
        sentence = f"There {'is one shape' if one else f'are {COUNT_WORDS[scene.count]} shapes'}."
        answer = str(scene.count)
    elif kind == "position":
        question = rng.choice(("Where is the shape?", "Where in the image is the shape?"))
        sentence = f"It is in the {scene.position}." if scene.position != "centre" else "It is in the centre."
        answer = scene.position
    elif kind == "yes_no":
        # Balanced: the object shown, or one that is not there (any of the three POPE samplings).
        if rng.random() < 0.5:
            name, present = object_name(scene.colour, scene.shape), True
        else:
            name, present = absent_object(scene, rng.choice(POPE_SETTINGS), rng, popular), False
        question = pope_question(name)
        sentence = f"Yes, there is {article(name)}." if present else f"No, there is no {name}."
        answer = "yes" if present else "no"
    else:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(QUESTION_KINDS)}")
    return (question + SHORT_ANSWER_SUFFIX, answer) if short else (question, sentence)


def conversation(scene: Scene, rng: random.Random, popular: Sequence[tuple[str, str]],
                 max_rounds: int = 3, probe_weight: float = PROBE_WEIGHT) -> list[tuple[str, str]]:
    """A training conversation about `scene`: a description or a question, then (two times in five) more
    rounds of other kinds. Each round's kind is drawn (without repeats) with weight 1, the yes/no probe with
    `probe_weight`. Short-answer questions carry the eval prompts' suffix half of the time."""
    weights = {k: probe_weight if k == "yes_no" else 1.0 for k in QUESTION_KINDS
               if (k != "position" or scene.count == 1) and (k != "yes_no" or probe_weight > 0)}
    rounds = 1 if rng.random() < 0.6 else rng.randint(2, max_rounds)
    chosen: list[str] = []
    for _ in range(rounds):
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        chosen.append(kind)
        del weights[kind]
    return [ask(scene, kind, rng, popular, short=kind != "describe" and rng.random() < 0.5) for kind in chosen]


def write_conversations(path: Path, items: list[tuple[str, Image.Image, list[tuple[str, str]]]]) -> Path:
    """Write (id, image, [(question, answer), ...]) items as a LLaVA instruction file (`<image>` in the first
    question, images in `image/` next to it), read by `minigpt4.data.conversations`."""
    (path.parent / "image").mkdir(parents=True, exist_ok=True)
    records = []
    for key, image, exchanges in items:
        (path.parent / "image" / f"{key}.jpg").write_bytes(_jpeg(image))
        messages = []
        for number, (question, answer) in enumerate(exchanges):
            messages.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
            messages.append({"from": "gpt", "value": answer})
        records.append({"id": key, "image": f"image/{key}.jpg", "conversations": messages})
    path.write_text(json.dumps(records, indent=1))
    return path


# ------------------------------------------------------------------------------------ evaluation splits


@dataclass
class EvalSplit:
    """One evaluation split in the official layouts `minigpt4 eval` reads (images named as COCO 2017 names them)."""

    name: str
    images: Path  # the image folder (`--images`)
    scenes: Path  # NAME.json: what each image shows, for the quickstart's own colour + shape score
    captions: Path  # COCO captions_NAME.json (`eval caption --annotations`)
    vqa_questions: Path  # VQAv2 questions (`eval vqav2 --questions`)
    vqa_annotations: Path  # VQAv2 annotations (`eval vqav2 --annotations`)
    pope: dict[str, Path]  # POPE question JSONL per setting (`eval pope --questions`)
    num_images: int


def caption_references(scene: Scene) -> list[str]:
    """Reference captions of a scene (as COCO has several per image)."""
    first = scene.caption()
    return [scene.description(), first[0].upper() + first[1:] + ".",
            f"{first[0].upper() + first[1:]} on a {scene.background} background."]


def write_eval_split(root: Path, name: str, first_seed: int, count: int, pairs: Sequence[tuple[str, str]],
                     popular: Sequence[tuple[str, str]], image_id_base: int = 1) -> EvalSplit:
    """Draw `count` scenes of `pairs` from seeds `first_seed...` into `root` with their files in the official
    layouts: COCO captions, VQAv2 questions + annotations (colour, shape, count and, for one shape, position;
    10 identical annotator answers), POPE JSONL per sampling setting: one probe per image, the object shown
    (yes) and an absent one (no) by turns, so each file is balanced and each image gets both across the settings
    (one probe per image and setting keeps the quickstart's evaluation short on a CPU)."""
    root.mkdir(parents=True, exist_ok=True)
    scenes, coco_images, coco_captions, questions, annotations = [], [], [], [], []
    pope: dict[str, list[dict]] = {setting: [] for setting in POPE_SETTINGS}
    for i in range(count):
        image, scene = draw_pair_scene(first_seed + i, pairs)
        image_id = image_id_base + i
        file_name = f"{image_id:012d}.jpg"
        (root / file_name).write_bytes(_jpeg(image))
        scenes.append({"image": file_name, "image_id": image_id, **asdict(scene)})
        coco_images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for text in caption_references(scene):
            coco_captions.append({"id": len(coco_captions) + 1, "image_id": image_id, "caption": text})
        rng = random.Random(f"eval-questions:{first_seed + i}")
        for kind, answer in short_answers(scene).items():
            question, _ = ask(scene, kind, rng, popular, short=False)
            question_id = len(questions) + 1
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "question_type": kind,
                "answer_type": "number" if kind == "count" else "other", "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": n} for n in range(1, 11)],
            })
        for number, setting in enumerate(POPE_SETTINGS):
            present = (i + number) % 2 == 0
            probe = object_name(scene.colour, scene.shape) if present else absent_object(scene, setting, rng, popular)
            pope[setting].append({"question_id": len(pope[setting]) + 1, "image": file_name,
                                  "text": pope_question(probe), "label": "yes" if present else "no"})
    split = EvalSplit(name, root, root / f"{name}.json", root / f"captions_{name}.json",
                      root / f"questions_{name}.json", root / f"annotations_{name}.json",
                      {setting: root / f"pope_{name}_{setting}.jsonl" for setting in POPE_SETTINGS}, count)
    split.scenes.write_text(json.dumps(scenes, indent=1))
    split.captions.write_text(json.dumps({"info": {"description": f"minigpt4 shapes, {name} split"},
                                          "images": coco_images, "annotations": coco_captions}, indent=1))
    split.vqa_questions.write_text(json.dumps({"task_type": "Open-Ended", "data_type": "shapes",
                                               "data_subtype": name, "questions": questions}, indent=1))
    split.vqa_annotations.write_text(json.dumps({"data_type": "shapes", "data_subtype": name,
                                                 "annotations": annotations}, indent=1))
    for setting, records in pope.items():
        split.pope[setting].write_text("".join(json.dumps(r) + "\n" for r in records))
    return split


# ------------------------------------------------------------------------------------ everything the quickstart uses

# Each split draws its scenes from its own seed range (offset from the run's base), so the splits are disjoint.
SPLIT_SEED_OFFSETS = {"stage1": 0, "stage2": 3_000_000, "validation": 6_000_000, "test": 7_000_000,
                      "test_unseen": 8_000_000}


@dataclass
class SyntheticData:
    """Where `generate` wrote everything."""

    root: Path
    stage1_shards: str  # brace pattern for stage1_batches, e.g. root/stage1/{00000..00003}.tar
    stage2: Path  # the instruction conversations (LLaVA layout), read by minigpt4.data.conversations
    validation: EvalSplit  # for choosing settings
    test: EvalSplit  # for reporting, never looked at while choosing; colour-shape pairs seen in training
    test_unseen: EvalSplit  # for reporting: only the HELD_OUT_PAIRS, never drawn for training
    num_stage1: int
    num_stage2: int


def popular_pairs(scenes: Sequence[Scene], top: int = 6) -> list[tuple[str, str]]:
    """The `top` colour-shape pairs drawn most often (POPE's "popular" objects), ties broken by name."""
    counts: dict[tuple[str, str], int] = {}
    for scene in scenes:
        counts[(scene.colour, scene.shape)] = counts.get((scene.colour, scene.shape), 0) + 1
    return sorted(counts, key=lambda pair: (-counts[pair], pair))[:top]


def generate(
    root: str | Path,
    num_stage1: int = 4800,
    num_stage2: int = 600,
    num_validation: int = 100,
    num_test: int = 100,
    num_test_unseen: int = 60,
    seed: int = 0,
    include_photos: bool = True,
    probe_weight: float = PROBE_WEIGHT,
) -> SyntheticData:
    """Generate the stage-1 shards, the stage-2 instruction conversations and the evaluation splits under `root`.

    Training images show only `SEEN_PAIRS`; validation and test show seen pairs, `test_unseen` only the held-out
    ones. The splits use disjoint seed ranges (`SPLIT_SEED_OFFSETS`), so no evaluation image is ever trained on.
    """
    root = Path(root)
    base = seed * 10_000_000
    stage1: list[tuple[str, Image.Image, str]] = []
    scenes: list[Scene] = []
    for i in range(num_stage1):
        image, scene = draw_pair_scene(base + SPLIT_SEED_OFFSETS["stage1"] + i, SEEN_PAIRS)
        stage1.append((f"{i:09d}", image, scene.caption()))
        scenes.append(scene)
    drawn = [draw_pair_scene(base + SPLIT_SEED_OFFSETS["stage2"] + i, SEEN_PAIRS) for i in range(num_stage2)]
    popular = popular_pairs(scenes + [scene for _, scene in drawn])
    rng = random.Random(f"conversations:{seed}")
    stage2 = [(f"shape{i}", image, conversation(scene, rng, popular, probe_weight=probe_weight))
              for i, (image, scene) in enumerate(drawn)]
    if include_photos:
        for name, image, caption, description in skimage_photos():
            stage1.append((f"photo_{name}", image, caption))
            stage2.append((f"photo_{name}", image, [(rng.choice(DESCRIBE_REQUESTS), description)]))
    # Interleave the photos with the shapes rather than leaving them all in the last shard.
    random.Random(seed).shuffle(stage1)
    pattern = write_stage1(root / "stage1", stage1)
    stage2_file = write_conversations(root / "stage2" / "conversations.json", stage2)
    splits = {name: write_eval_split(root / name, name, base + SPLIT_SEED_OFFSETS[name], count,
                                     HELD_OUT_PAIRS if name == "test_unseen" else SEEN_PAIRS, popular)
              for name, count in (("validation", num_validation), ("test", num_test),
                                  ("test_unseen", num_test_unseen))}
    return SyntheticData(root, pattern, stage2_file, splits["validation"], splits["test"], splits["test_unseen"],
                         len(stage1), len(stage2))
