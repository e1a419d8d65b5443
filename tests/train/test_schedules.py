"""WSD against transformers.get_wsd_schedule, step by step; the other schedules against their formulas."""

import math

import pytest
import torch
from transformers import get_wsd_schedule

from medstate import MedstateError
from medstate.train import TrainConfig
from medstate.train.schedules import learning_rate_factor, wsd_steps


@pytest.mark.parametrize(
    ("max_steps", "fractions", "shape", "floor"),
    [
        (100, [0.1, 0.7, 0.2], "cosine", 0.0),
        (1000, [0.10, 0.65, 0.25], "cosine", 0.1),  # BioMamba's schedule as its code ran it
        (37, [0.2, 0.5, 0.3], "linear", 0.05),
        (50, [0.0, 0.6, 0.4], "1-sqrt", 0.0),
    ],
)
def test_wsd_equals_transformers_at_every_step(max_steps, fractions, shape, floor):
    config = TrainConfig(
        max_steps=max_steps, schedule="wsd", wsd_fractions=fractions, decay_shape=shape, min_lr_ratio=floor
    )
    warmup, stable, decay = wsd_steps(max_steps, fractions)
    assert warmup + stable + decay == max_steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_wsd_schedule(
        optimizer,
        num_warmup_steps=warmup,
        num_stable_steps=stable,
        num_decay_steps=decay,
        decay_type=shape,
        min_lr_ratio=floor,
    )
    for step in range(max_steps + 3):
        assert learning_rate_factor(step, config) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-12), step


def test_wsd_shape_by_hand():
    config = TrainConfig(
        max_steps=10, schedule="wsd", wsd_fractions=[0.2, 0.4, 0.4], decay_shape="linear", min_lr_ratio=0.1
    )
    factors = [learning_rate_factor(s, config) for s in range(10)]
    # warmup 2 steps from 0.1, stable 4 steps at 1, linear decay over 4 steps towards 0.1
    expected = [0.1, 0.55, 1, 1, 1, 1, 1.0, 0.775, 0.55, 0.325]
    assert factors == pytest.approx(expected)


@pytest.mark.parametrize("fractions", [[0.1, 0.65, 0.2], [0.5, 0.5], [0.2, 0.9, -0.1]])
def test_wsd_fractions_that_do_not_sum_to_one_are_rejected(fractions):
    with pytest.raises(MedstateError, match="wsd_fractions"):
        TrainConfig(max_steps=100, schedule="wsd", wsd_fractions=fractions)


def test_cosine_after_warmup():
    config = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine")
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(40, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(MedstateError, match="unknown schedule"):
        TrainConfig(schedule="exponential")
