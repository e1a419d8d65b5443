"""bf16 autocast is chosen by measurement: the faster dtype (by at least 1.2x) wins, as asked otherwise."""

import pytest
import torch

from medstate import MedstateError
from medstate.loading import from_data
from medstate.train import precision
from medstate.train.loop import TrainConfig


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(1.0, 0.5, True), (1.0, 0.9, False), (0.01, 1.0, False)])
def test_auto_follows_the_measurement(monkeypatch, fp32, bf16, expected):
    seconds = {torch.float32: fp32, torch.bfloat16: bf16}
    monkeypatch.setattr(precision, "matmul_seconds", lambda dtype, device: seconds[dtype])
    assert precision.use_bf16("auto", torch.device("cpu")) is expected
    assert precision.use_bf16(True, torch.device("cpu")) is True


def test_setting_is_checked():
    with pytest.raises(MedstateError, match="auto"):
        precision.use_bf16("sometimes", torch.device("cpu"))
    assert from_data(TrainConfig, {"bf16": "auto"}, "x").bf16 == "auto"
    assert isinstance(precision.use_bf16("auto", torch.device("cpu")), bool)
