"""Integrated gradients: completeness (attributions add up to the change of the probability) and the plot."""

import numpy as np
import pytest
import torch

from medstate.interp import integrated_gradients, plot_timeline
from tests.ehr.test_model import sample, tiny


@pytest.mark.parametrize("version", [1, 2])
def test_attributions_add_up_to_the_probability_change(version, tmp_path):
    model = tiny(version)
    torch.nn.init.normal_(model.classifier[1].weight, std=1.0)  # a classifier far from constant
    arrays = sample(np.random.default_rng(0), 25)
    tokens = [f"T{i}" for i in arrays["input_ids"]]
    result = integrated_gradients(model, arrays, tokens, steps=128)
    assert len(result.scores) == 25
    assert result.scores.sum() == pytest.approx(result.probability - result.baseline_probability, abs=2e-3)
    assert result.convergence_delta < 2e-3
    assert 0 < result.probability < 1
    plot_timeline(result, arrays["times"], tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 5_000
