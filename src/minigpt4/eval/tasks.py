"""The evaluation tasks of `minigpt4 eval`: their readers (official file layouts, read unchanged), default
prompts and scoring.

Each reader turns its files into `Sample`s (one image, the text asked about it, the references); `score`
turns predictions into the task's metrics (`minigpt4.eval.metrics`). A file that is not in the layout
its task expects is a `TaskFileError` naming the file and what is missing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from minigpt4.eval.metrics import caption_scores, exact_match, pope_scores, vqa_accuracy

QUESTION = "{question}"
SHORT_ANSWER = QUESTION + " Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
CAPTION_PROMPT = "Briefly describe this image in one sentence."
REAL_PHOTOS = "resources/realphotos.json"


class TaskFileError(ValueError):
    """A task file that is missing, not JSON, or not in its task's layout."""


@dataclass
class Sample:
    """One image and what is asked about it: `question` fills the prompt's {question} (None for captioning);
    `references` are the reference captions, the annotators' answers, or the one answer or yes/no label.
    `prompt`, when set, is asked instead of the task's prompt (the captioning requests of `realphotos`)."""

    id: str
    image: Path
    question: str | None
    references: list[str]
    prompt: str | None = None


@dataclass(frozen=True)
class Task:
    """A task: what its files are, its default prompt and new-token budget, and how it is scored."""

    files: str  # for --help and errors
    prompt: str
    max_new_tokens: int
    asks_questions: bool


TASKS: dict[str, Task] = {
    "caption": Task("--annotations: COCO captions_*.json (also nocaps), Karpathy's dataset_*.json, or LAVIS's "
                    "coco_karpathy_*.json; --images: the image folder", CAPTION_PROMPT, 40, False),
    "vqav2": Task("--questions and --annotations: VQAv2 *_questions.json and *_annotations.json; --images: the "
                  "COCO image folder", SHORT_ANSWER, 10, True),
    "okvqa": Task("--questions and --annotations: OK-VQA OpenEnded_mscoco_*_questions.json and "
                  "mscoco_*_annotations.json; --images: the COCO image folder", SHORT_ANSWER, 10, True),
    "gqa": Task("--questions: GQA *_balanced_questions.json; --images: GQA's images folder", SHORT_ANSWER, 10, True),
    "pope": Task("--questions: a POPE question file (JSON lines: question_id, image, text, label); --images: the "
                 "COCO image folder", SHORT_ANSWER, 10, True),
    "folder": Task("--questions: JSON lines {\"image\", \"question\", \"answer\" or \"answers\"[, \"id\"]}; "
                   "--images: the folder the image paths are in (default: the JSONL's)", SHORT_ANSWER, 10, True),
    "realphotos": Task("no files: 14 photos that come with scikit-image and matplotlib, with our captions and "
                       "questions (a smoke test of real-photo behaviour, not a benchmark); --prompt is for the "
                       f"questions, captions are asked for with {CAPTION_PROMPT!r}", SHORT_ANSWER, 40, True),
}


# ------------------------------------------------------------------------------------ reading


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskFileError(f"{what} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskFileError(f"{what} {path} is not JSON ({err})") from None


def _read_json_lines(path: Path, what: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskFileError(f"{what} {path}: no such file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{what} {path} line {number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise TaskFileError(f"{what} {path} line {number} is not a JSON object")
        records.append(record)
    return records


def _layout_error(path: Path, layout: str, err: Exception) -> TaskFileError:
    return TaskFileError(f"{path} is not {layout} ({type(err).__name__}: {err})")


def read_captions(annotations: Path, images: Path, split: str = "test") -> list[Sample]:
    """Captioning samples, one per image, from any of the three layouts in use.

    COCO's `captions_*.json` (and nocaps', the same layout): `images` [{id, file_name}] and
    `annotations` [{image_id, caption}]. Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`:
    `images` [{filepath?, filename, split, sentences [{raw}], cocoid? / imgid}], of which `split` is
    kept. LAVIS's `coco_karpathy_{val,test}.json`: a list of {image, caption [..]}.
    """
    data = _read_json(annotations, "--annotations")
    if isinstance(data, list):
        try:
            return [Sample(Path(r["image"]).stem, images / r["image"], None,
                           [r["caption"]] if isinstance(r["caption"], str) else list(r["caption"])) for r in data]
        except (KeyError, TypeError) as err:
            raise _layout_error(annotations, "a LAVIS Karpathy-split file (a list of {image, caption})", err) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise TaskFileError(f"--annotations {annotations} has no 'images' list: give a COCO captions_*.json, a "
                            "Karpathy dataset_*.json or a LAVIS coco_karpathy_*.json")
    if "annotations" in data:
        try:
            refs: dict[str, list[str]] = {}
            for annotation in data["annotations"]:
                refs.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
            return [Sample(str(image["id"]), images / image["file_name"], None, refs[str(image["id"])])
                    for image in data["images"] if str(image["id"]) in refs]
        except (KeyError, TypeError) as err:
            raise _layout_error(annotations, "a COCO captions file", err) from None
    try:
        kept = [image for image in data["images"] if image["split"] == split]
        samples = [Sample(str(image.get("cocoid", image["imgid"])),
                          images / image.get("filepath", "") / image["filename"], None,
                          [sentence["raw"] for sentence in image["sentences"]]) for image in kept]
    except (KeyError, TypeError) as err:
        raise _layout_error(annotations, "a Karpathy dataset_*.json (images with split, filename, sentences)",
                            err) from None
    if not samples:
        found = sorted({str(image.get("split")) for image in data["images"]})
        raise TaskFileError(f"--annotations {annotations} has no images in split {split!r} (it has {found}); "
                            "choose one with --split")
    return samples


def coco_image(images: Path, subtype: str, image_id: int) -> Path:
    """A COCO image by id: `COCO_val2014_000000391895.jpg` (2014 names, as VQAv2 and OK-VQA use) when that
    file is there, otherwise the 2017 name `000000391895.jpg`."""
    named_2014 = images / f"COCO_{subtype}_{int(image_id):012d}.jpg"
    return named_2014 if named_2014.exists() else images / f"{int(image_id):012d}.jpg"


def read_vqa(questions: Path, annotations: Path, images: Path) -> list[Sample]:
    """VQAv2 or OK-VQA samples: `questions` {data_subtype, questions [{question_id, image_id, question}]} and
    `annotations` {annotations [{question_id, answers [{answer}]}]} (the two official files, unchanged)."""
    asked = _read_json(questions, "--questions")
    answered = _read_json(annotations, "--annotations")
    try:
        answers = {a["question_id"]: [entry["answer"] for entry in a["answers"]] for a in answered["annotations"]}
    except (KeyError, TypeError) as err:
        raise _layout_error(annotations, "a VQA annotations file ({annotations: [{question_id, answers}]})",
                            err) from None
    try:
        subtype = asked.get("data_subtype", "val2014")
        return [Sample(str(q["question_id"]), coco_image(images, subtype, q["image_id"]), q["question"],
                       answers[q["question_id"]]) for q in asked["questions"]]
    except (KeyError, TypeError, AttributeError) as err:
        raise _layout_error(questions, f"a VQA questions file answered by {annotations} "
                            "({questions: [{question_id, image_id, question}]})", err) from None


def read_gqa(questions: Path, images: Path) -> list[Sample]:
    """GQA samples from a balanced questions file: {question_id: {imageId, question, answer, ...}}."""
    data = _read_json(questions, "--questions")
    try:
        return [Sample(str(qid), images / f"{q['imageId']}.jpg", q["question"], [q["answer"]])
                for qid, q in data.items()]
    except (KeyError, TypeError, AttributeError) as err:
        raise _layout_error(questions, "a GQA questions file ({id: {imageId, question, answer}})", err) from None


def read_pope(questions: Path, images: Path) -> list[Sample]:
    """POPE samples from its JSON-lines question file: {question_id, image, text, label} per line."""
    try:
        samples = [Sample(str(r["question_id"]), images / r["image"], r["text"], [r["label"]])
                   for r in _read_json_lines(questions, "--questions")]
    except (KeyError, TypeError) as err:
        raise _layout_error(questions, "a POPE question file (lines of {question_id, image, text, label})",
                            err) from None
    bad = next((s for s in samples if s.references[0] not in ("yes", "no")), None)
    if bad is not None:
        raise TaskFileError(f"--questions {questions}: question {bad.id} has label {bad.references[0]!r}; POPE "
                            "labels are 'yes' or 'no'")
    return samples


def read_folder(questions: Path, images: Path | None) -> list[Sample]:
    """Any images with questions: JSON lines {image, question, answer (one) or answers (several)[, id]}; image
    paths are relative to `images` (default: the JSONL's folder); the id defaults to the line number."""
    root = images if images is not None else questions.parent
    samples = []
    for number, record in enumerate(_read_json_lines(questions, "--questions"), 1):
        try:
            references = record["answers"] if "answers" in record else [record["answer"]]
            if not isinstance(references, list) or not all(isinstance(r, str) for r in references) or not references:
                raise TypeError("'answers' must be a non-empty list of strings")
            samples.append(Sample(str(record.get("id", number)), root / record["image"], str(record["question"]),
                                  references))
        except (KeyError, TypeError) as err:
            raise TaskFileError(f"--questions {questions} line {number} is not {{image, question, answer or "
                                f"answers}} ({type(err).__name__}: {err})") from None
    return samples


def _package_data(package: str) -> Path:
    """The folder of sample images a dependency installs (imported only when needed)."""
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data"
    raise TaskFileError(f"minigpt4/{REAL_PHOTOS} names an unknown package {package!r}")


def read_real_photos() -> list[Sample]:
    """The real-photo set (`minigpt4/resources/realphotos.json`): per photo one captioning sample
    (`PHOTO/caption`, asked with CAPTION_PROMPT) and its questions (`PHOTO/q1`, ...), each with the answers
    we accept. The photos are read where scikit-image and matplotlib installed them."""
    data = json.loads(resources.files("minigpt4").joinpath(REAL_PHOTOS).read_text(encoding="utf-8"))
    samples = []
    for photo in data["photos"]:
        image = _package_data(photo["package"]) / photo["file"]
        samples.append(Sample(f"{photo['id']}/caption", image, None, photo["captions"], prompt=CAPTION_PROMPT))
        samples += [Sample(f"{photo['id']}/q{number}", image, item["question"], item["answers"])
                    for number, item in enumerate(photo["questions"], 1)]
    return samples


def read_task(task: str, questions: Path | None, annotations: Path | None, images: Path | None,
              split: str = "test") -> list[Sample]:
    """The samples of `task` from the files given; a file the task needs and was not given is an error."""
    needs = {"caption": ("annotations", "images"), "vqav2": ("questions", "annotations", "images"),
             "okvqa": ("questions", "annotations", "images"), "gqa": ("questions", "images"),
             "pope": ("questions", "images"), "folder": ("questions",), "realphotos": ()}[task]
    given = {"questions": questions, "annotations": annotations, "images": images}
    missing = [f"--{name}" for name in needs if given[name] is None]
    if missing:
        raise TaskFileError(f"eval {task} needs {' and '.join(missing)} ({TASKS[task].files})")
    if task == "caption":
        samples = read_captions(annotations, images, split)
    elif task in ("vqav2", "okvqa"):
        samples = read_vqa(questions, annotations, images)
    elif task == "gqa":
        samples = read_gqa(questions, images)
    elif task == "pope":
        samples = read_pope(questions, images)
    elif task == "realphotos":
        samples = read_real_photos()
    else:
        samples = read_folder(questions, images)
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise TaskFileError(f"eval {task}: sample id {duplicate!r} appears more than once in its files")
    return samples


# ------------------------------------------------------------------------------------ scoring


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _answer_score(prediction: str, references: list[str]) -> float:
    # Several annotators: the VQA rule; one answer: exact match.
    return vqa_accuracy(prediction, references) if len(references) > 1 else exact_match(prediction, references[0])


SCORERS: dict[str, Callable[[list[Sample], dict[str, str]], dict[str, float]]] = {
    "caption": lambda samples, predicted: caption_scores({s.id: predicted[s.id] for s in samples},
                                                         {s.id: s.references for s in samples}),
    "vqav2": lambda samples, predicted: {"accuracy": _mean([vqa_accuracy(predicted[s.id], s.references)
                                                            for s in samples])},
    "gqa": lambda samples, predicted: {"accuracy": _mean([exact_match(predicted[s.id], s.references[0])
                                                          for s in samples])},
    "pope": lambda samples, predicted: pope_scores([predicted[s.id] for s in samples],
                                                   [s.references[0] for s in samples]),
    "folder": lambda samples, predicted: {"accuracy": _mean([_answer_score(predicted[s.id], s.references)
                                                             for s in samples])},
}
SCORERS["okvqa"] = SCORERS["vqav2"]


def _real_photo_scores(samples: list[Sample], predicted: dict[str, str]) -> dict[str, float]:
    """Caption scores over the captioning samples; over the questions, the share answered with one of the
    accepted answers (after the VQA normalisation)."""
    captions = [s for s in samples if s.prompt is not None]
    questions = [s for s in samples if s.prompt is None]
    scores = SCORERS["caption"](captions, predicted) if captions else {}
    scores["qa_accuracy"] = _mean([max(exact_match(predicted[s.id], answer) for answer in s.references)
                                   for s in questions])
    return scores


SCORERS["realphotos"] = _real_photo_scores


def score(task: str, samples: list[Sample], predicted: dict[str, str]) -> dict[str, float]:
    """The task's metrics over `samples`, each of which must have a prediction in `predicted` (id -> text)."""
    if not samples:
        return {}
    return SCORERS[task](samples, predicted)
