"""Learning-rate schedules as a factor of the peak rate at each optimizer step.

- cosine / linear / constant: linear warmup over `warmup_steps` ((step + 1) / warmup_steps, so the first step
  already learns), then cosine or linear decay to 0 at `max_steps`, or constant.
- wsd (warmup-stable-decay, MiniCPM; used by BioMamba): `wsd_fractions` of `max_steps` for warmup, stable and
  decay, which must sum to 1; warmup from `min_lr_ratio`, decay (`decay_shape` cosine, linear or 1-sqrt) down to
  `min_lr_ratio`. Step for step the same factors as `transformers.get_wsd_schedule` given the same step counts
  (warmup starts at `min_lr_ratio`, not at the first step's share, as there).
"""

from __future__ import annotations

import math
from typing import Any

from medstate.errors import MedstateError

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("cosine", "linear", "1-sqrt")


def wsd_steps(max_steps: int, fractions: tuple[float, float, float] | list[float]) -> tuple[int, int, int]:
    """(warmup, stable, decay) step counts; the stable phase takes the rounding remainder."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise MedstateError(
            f"wsd_fractions (warmup, stable, decay) must be 3 numbers >= 0 summing to 1, got {list(fractions)}"
        )
    warmup, decay = round(fractions[0] * max_steps), round(fractions[2] * max_steps)
    return warmup, max_steps - warmup - decay, decay


def check_schedule(config: Any) -> None:
    """The schedule fields of a TrainConfig, checked once (a user's mistake is one line)."""
    if config.schedule not in SCHEDULES:
        raise MedstateError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if config.decay_shape not in DECAY_SHAPES:
        raise MedstateError(f"unknown decay_shape {config.decay_shape!r}; choose one of {', '.join(DECAY_SHAPES)}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise MedstateError(f"min_lr_ratio must be within [0, 1], got {config.min_lr_ratio}")
    if config.schedule == "wsd":
        wsd_steps(config.max_steps, config.wsd_fractions)


def learning_rate_factor(step: int, config: Any) -> float:
    """The factor of the peak learning rate for optimizer step `step` (0-based) of a TrainConfig."""
    if config.schedule == "wsd":
        return _wsd_factor(step, config)
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise MedstateError(f"unknown schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _wsd_factor(step: int, config: Any) -> float:
    warmup, stable, decay = wsd_steps(config.max_steps, config.wsd_fractions)
    floor = config.min_lr_ratio
    if step < warmup:
        return floor + (1.0 - floor) * step / warmup
    if step < warmup + stable:
        return 1.0
    if step >= warmup + stable + decay:
        return floor
    progress = (step - warmup - stable) / max(1, decay)
    shape = {
        "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
        "linear": lambda p: 1.0 - p,
        "1-sqrt": lambda p: 1.0 - math.sqrt(p),
    }[config.decay_shape]
    return floor + (1.0 - floor) * shape(progress)
