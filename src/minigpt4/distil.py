"""A small EVA-style ViT distilled from EfficientNet-Lite0: the embedded model's tower in a form BLIP-2 holds.

transformers' `Blip2ForConditionalGeneration` always builds a ViT (`Blip2VisionModel`) in front of its
Q-Former, so a model whose tower is EfficientNet-Lite0 cannot be exported (`minigpt4.export`), and no
pretrained ViT ships inside any registry package. So the project makes one: the student (the
`embedded-vit` preset's vision config, patch 32 at 224 px = a CLS token + 49 patch tokens, like
EfficientNet's 7x7 map) learns to reproduce the frozen EfficientNet-Lite0's feature tokens, through a
linear head that is dropped afterwards, on pictures of the quickstart's own kind (shapes drawn by
`minigpt4.data.synthetic` from a seed range no quickstart split uses, plus random crops of the real
photos). The targets are the teacher's tokens layer-normed per token, which is what `ln_vision`
hands the Q-Former; the student's CLS token learns the normed mean token.

The student is written in `eva_vit_g.pth`'s layout (`model.weights.vit` reads it as it reads the
released file), with a JSON record beside it (plan, losses, held-out fit). `prepare_distilled_vit`
makes it once per machine, like `minigpt4.embedded.prepare_smollm2`; a write is atomic, and a file
made with another plan or format version is made again rather than trusted.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import ModelConfig, VisionConfig

log = logging.getLogger(__name__)

DISTIL_VERSION = "1"  # bump when the recipe changes, so cached towers are made again
# Shape seeds of the distillation images. Quickstart run seed s draws its splits from s * 10_000_000 +
# synthetic.SPLIT_SEED_OFFSETS[split] onward (under 1_000_000 images each), so this range, above run seed 0's
# last split and below run seed 1's first, holds no image any quickstart trains or is scored on.
DISTIL_FIRST_SEED = 9_000_000
HELD_OUT_IMAGES = 64  # drawn after the training images, for the fit the record reports


@dataclass(frozen=True)
class DistilPlan:
    """How much the student sees. The default took 43 min on a busy 2-core machine (load ~9); the record beside the
    file keeps the wall and CPU seconds of each run."""

    shape_images: int = 1024
    photo_crops: int = 16  # random crops of each real photo, on top of the shapes
    steps: int = 240
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0


DEFAULT_PLAN = DistilPlan()


@dataclass
class DistilReport:
    path: Path
    steps: int
    first_loss: float
    final_loss: float  # mean over the last tenth of the steps
    held_out_mse: float  # on new images; 1.0 is what predicting zeros scores (the targets are normed)
    held_out_cosine: float  # mean cosine similarity of predicted and teacher tokens on new images
    seconds: float
    cpu_seconds: float  # of this process, all threads: on a busy machine a truer measure of the work than `seconds`


def _jpeg_round_trip(image):
    """The image as the quickstart's data shows it: written as a JPEG (quality 92), read back."""
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class DistilImages:
    """Image `index` -> (3, 224, 224) CLIP-normalised pixels, the same every time it is asked for.

    Indices below `num_shapes` are drawn shapes; the rest are random crops of the real photos, the crop
    drawn from a generator seeded by the index. Held-out shapes follow the training ones.
    """

    def __init__(self, plan: DistilPlan, image_size: int = 224):
        from minigpt4.data.synthetic import skimage_photos
        from minigpt4.processing.image import eval_transform, train_transform

        self.num_shapes = plan.shape_images
        self.photos = [image for _, image, _, _ in skimage_photos()] if plan.photo_crops else []
        self.crops = plan.photo_crops
        self.size = image_size
        self.eval_transform = eval_transform(image_size)
        self.train_transform = train_transform(image_size)
        self.seed = plan.seed

    def __len__(self) -> int:
        return self.num_shapes + len(self.photos) * self.crops

    def pixels(self, index: int) -> torch.Tensor:
        from minigpt4.data.synthetic import draw_scene

        if index < self.num_shapes:
            image, _ = draw_scene(DISTIL_FIRST_SEED + index, size=self.size)
            return self.eval_transform(_jpeg_round_trip(image))
        photo = self.photos[(index - self.num_shapes) // self.crops]
        with torch.random.fork_rng(devices=[]):  # RandomResizedCrop draws from torch's global generator
            torch.manual_seed(self.seed * 1_000_003 + index)
            return self.train_transform(photo)

    def held_out(self, count: int) -> torch.Tensor:
        from minigpt4.data.synthetic import draw_scene

        first = DISTIL_FIRST_SEED + self.num_shapes
        return torch.stack([self.eval_transform(_jpeg_round_trip(draw_scene(first + i, size=self.size)[0]))
                            for i in range(count)])

    def all_pixels(self, teacher: nn.Module, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's pixels and its `teacher_targets`, both fp16 (the teacher runs once per image, not once
        per epoch: it costs more than a student step on a CPU)."""
        pixels, targets = [], []
        for start in range(0, len(self), chunk):
            batch = torch.stack([self.pixels(i) for i in range(start, min(len(self), start + chunk))])
            pixels.append(batch.half())
            targets.append(teacher_targets(teacher, batch).half())
        return torch.cat(pixels), torch.cat(targets)


def _zero_key_biases(student: nn.Module) -> None:
    """EVA has no key bias. It cannot change the attention (softmax ignores a shift shared by every key), so its
    gradient is only rounding noise, which Adam would still turn into steps: keep it at zero."""
    with torch.no_grad():
        for layer in student.encoder.layers:
            bias = layer.self_attn.qkv.bias
            width = bias.shape[0] // 3
            bias[width:2 * width].zero_()


def teacher_targets(teacher: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1 + 49, 1280): the normed mean token (for CLS), then the teacher's 49 tokens normed one by one."""
    with torch.no_grad():
        tokens = teacher(pixels.contiguous(memory_format=torch.channels_last))
    width = tokens.shape[-1]
    return F.layer_norm(torch.cat([tokens.mean(1, keepdim=True), tokens], 1), (width,))


def student_predictions(student: nn.Module, head: nn.Linear, pixels: torch.Tensor) -> torch.Tensor:
    """The student's tokens normed as ln_vision (at its initial weights) norms them, through the head."""
    tokens = student(pixels)
    return head(F.layer_norm(tokens, (tokens.shape[-1],)))


def build_teacher() -> nn.Module:
    """The frozen EfficientNet-Lite0 with its ImageNet weights, channels-last (4x faster on a CPU here)."""
    from minigpt4.model.efficientnet import EfficientNetLiteTower, load_efficientnet_lite0_weights

    teacher = EfficientNetLiteTower(VisionConfig(arch="efficientnet_lite0", image_size=224))
    load_efficientnet_lite0_weights(teacher)
    return teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _learning_rate(plan: DistilPlan, step: int) -> float:
    """Linear warmup over the first 5% of the steps, then cosine down to a tenth."""
    warmup = max(1, plan.steps // 20)
    if step < warmup:
        return plan.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, plan.steps - warmup)
    return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distil_vit(student_config: VisionConfig, path: str | Path, plan: DistilPlan = DEFAULT_PLAN,
               teacher: nn.Module | None = None,
               progress: Callable[[int, float], None] | None = None) -> DistilReport:
    """Distil EfficientNet-Lite0 into a ViT of `student_config` and write it to `path` (a .safetensors file in
    `eva_vit_g.pth`'s layout, plus `path`.json). `progress(step, loss)` is called after every step."""
    from safetensors.torch import save_file

    from minigpt4.convert import vision_to_eva
    from minigpt4.model.vision import build_vision_tower

    if student_config.arch != "eva_vit_g" or student_config.image_size != 224:
        raise ValueError(f"the student must be vision.arch=eva_vit_g at 224 px (EfficientNet-Lite0's size), got "
                         f"{student_config.arch} at {student_config.image_size}")
    if (student_config.image_size // student_config.patch_size) ** 2 != 49:
        raise ValueError(f"vision.patch_size={student_config.patch_size}: the student needs 7x7 patches at 224 px "
                         "to match EfficientNet-Lite0's 7x7 feature map; use 32")
    path = Path(path)
    start, cpu_start = time.perf_counter(), time.process_time()
    teacher = teacher if teacher is not None else build_teacher()
    data = DistilImages(plan, student_config.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        student = build_vision_tower(ModelConfig(vision=student_config))
        probe = teacher_targets(teacher, data.held_out(1))
        head = nn.Linear(student_config.width, probe.shape[-1])
        order = torch.randperm(len(data)).tolist()
    log.info("teacher tokens of %d images", len(data))
    all_pixels, all_targets = data.all_pixels(teacher)
    params = list(student.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    student.train()
    losses: list[float] = []
    cursor = 0
    for step in range(plan.steps):
        if cursor + plan.batch_size > len(order):
            order = order[cursor:] + torch.randperm(len(data), generator=torch.Generator().manual_seed(step)).tolist()
            cursor = 0
        indices = torch.tensor(order[cursor:cursor + plan.batch_size])
        cursor += plan.batch_size
        predicted = student_predictions(student, head, all_pixels[indices].float())
        loss = F.mse_loss(predicted, all_targets[indices].float())
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(plan, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _zero_key_biases(student)
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    student.eval()
    with torch.no_grad():
        held_out = data.held_out(HELD_OUT_IMAGES)
        predicted, target = student_predictions(student, head, held_out), teacher_targets(teacher, held_out)
        mse = float(F.mse_loss(predicted, target))
        cosine = float(F.cosine_similarity(predicted, target, dim=-1).mean())
    tail = losses[-max(1, plan.steps // 10):]
    report = DistilReport(path, plan.steps, losses[0], sum(tail) / len(tail), mse, cosine,
                          time.perf_counter() - start, time.process_time() - cpu_start)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    eva = vision_to_eva(student.state_dict(), "the distilled student")  # the released file's layout
    save_file({k: v.detach().contiguous() for k, v in eva.items()}, str(partial), metadata={"format": "pt"})
    record = {"version": DISTIL_VERSION, "student": asdict(student_config), "plan": asdict(plan),
              "first_loss": report.first_loss, "final_loss": report.final_loss,
              "held_out_mse": mse, "held_out_cosine": cosine, "seconds": round(report.seconds, 1),
              "cpu_seconds": round(report.cpu_seconds, 1)}
    # The tensors first, then their record: a crash in between leaves a file whose record does not match it,
    # which `prepare_distilled_vit` makes again.
    partial.rename(path)
    record_partial = partial.with_name(partial.name + ".json")
    record_partial.write_text(json.dumps(record, indent=1) + "\n")
    record_partial.rename(_record_path(path))
    log.info("distilled %s in %.0fs: held-out token MSE %.3f, cosine %.3f", path, report.seconds, mse, cosine)
    return report


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_record(path: str | Path) -> dict | None:
    """The JSON record written beside a distilled tower, or None where there is none."""
    record = _record_path(Path(path))
    return json.loads(record.read_text()) if record.is_file() else None


def prepare_distilled_vit(student_config: VisionConfig, path: str | Path, plan: DistilPlan = DEFAULT_PLAN,
                          progress: Callable[[int, float], None] | None = None) -> tuple[Path, bool]:
    """The distilled tower at `path`, made now unless a file of this version, student and plan is there already.

    Returns (path, whether it was made now).
    """
    path = Path(path).expanduser()
    record = read_record(path)
    wanted = {"version": DISTIL_VERSION, "student": asdict(student_config), "plan": asdict(plan)}
    if path.is_file() and record is not None and all(record.get(k) == v for k, v in wanted.items()):
        return path, False
    distil_vit(student_config, path, plan, progress=progress)
    return path, True
