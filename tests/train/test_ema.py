"""EMA of weights against its closed form ema_k = d^k θ_0 + (1 − d) Σ_j d^(k−j) θ_j."""

import pytest
import torch

from medstate import MedstateError
from medstate.train.ema import EMA


def test_ema_equals_closed_form_and_applies_reversibly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    decay = 0.9
    ema = EMA(model, decay)
    history = [model.weight.detach().clone()]
    for _ in range(7):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.update(model)
    k = len(history) - 1
    closed = decay**k * history[0] + sum((1 - decay) * decay ** (k - j) * history[j] for j in range(1, k + 1))
    trained = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model.weight, closed, atol=1e-6)
    assert torch.equal(model.weight, trained)


def test_ema_state_round_trip_and_bad_decay():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.5)
    other = EMA(torch.nn.Linear(2, 2), 0.5)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(MedstateError):
        EMA(model, 1.0)
    with pytest.raises(MedstateError):
        other.load_state_dict({"weight": torch.zeros(2, 2)})
