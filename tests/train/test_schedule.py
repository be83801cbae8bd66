"""The lr schedule against the numbers the original produces (reference §5.2)."""

import math

import pytest

from minigpt4.config import TrainConfig
from minigpt4.train.schedule import lr_at

STAGE1 = TrainConfig(lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, epochs=4, iters_per_epoch=5000)
STAGE2 = TrainConfig(lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, epochs=5, iters_per_epoch=200)


@pytest.mark.parametrize(
    "cfg, step, expected",
    [
        (STAGE1, 0, 1e-6),
        (STAGE1, 4999, 9.9980e-5),
        (STAGE1, 5000, 9.7071e-5),  # the legacy step down where warmup ends
        (STAGE1, 10000, 9.0e-5),
        (STAGE1, 19999, 8.0e-5),
        (STAGE2, 199, 2.9855e-5),
        (STAGE2, 200, 2.8090e-5),
        (STAGE2, 999, 1.0e-5),
    ],
)
def test_legacy_schedule_matches_the_original(cfg, step, expected):
    assert lr_at(step, cfg) == pytest.approx(expected, rel=1e-4)


def test_legacy_warmup_counts_steps_inside_the_epoch():
    # warmup longer than an epoch: the original restarts the ramp at each epoch boundary
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_lr=0.0, warmup_steps=20, epochs=4, iters_per_epoch=10)
    assert lr_at(10, cfg) == pytest.approx(0.0)
    assert lr_at(15, cfg) == pytest.approx(1e-3 * 5 / 20)


def test_continuous_schedule_has_no_step_and_ends_at_min_lr():
    cfg = TrainConfig(**{**STAGE1.__dict__, "schedule": "continuous"})
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)  # peak reached exactly where warmup ends
    assert lr_at(5001, cfg) < 1e-4
    assert lr_at(19999, cfg) == pytest.approx(8e-5, rel=1e-6)
    lrs = [lr_at(t, cfg) for t in range(4990, 5010)]
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < 1e-7  # smooth across the warmup end


def test_schedule_is_a_pure_function_of_the_step():
    assert [lr_at(t, STAGE2) for t in range(1000)] == [lr_at(t, STAGE2) for t in range(1000)]
    assert all(math.isfinite(lr_at(t, STAGE2)) for t in range(1200))  # past the end it stays at min_lr
    assert lr_at(1100, STAGE2) == pytest.approx(1e-5)
