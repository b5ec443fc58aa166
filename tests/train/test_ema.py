"""WeightEMA against the recurrence written out by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.ema import WeightEMA


def test_update_is_the_exponential_average_written_out():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    m[1].bias.requires_grad_(False)  # frozen: not averaged
    d = 0.9
    w = [m[0].weight.detach().clone()]
    ema = WeightEMA(m, d)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    for _ in range(3):
        with torch.no_grad():
            m[0].weight.add_(torch.randn_like(m[0].weight))
        w.append(m[0].weight.detach().clone())
        ema.update(m)
    # e_3 = d^3 w_0 + d^2 (1 - d) w_1 + d (1 - d) w_2 + (1 - d) w_3
    expected = d ** 3 * w[0] + d ** 2 * (1 - d) * w[1] + d * (1 - d) * w[2] + (1 - d) * w[3]
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ema.shadow["0.bias"], m[0].bias.detach())  # never changed: stays put


def test_over_replaces_only_the_averaged_parameters_and_state_round_trips():
    m = torch.nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    ema = WeightEMA(m, 0.5)
    ema.shadow["weight"].fill_(7.0)
    full = ema.over(m.state_dict())
    assert torch.equal(full["weight"], torch.full((2, 2), 7.0)) and torch.equal(full["bias"], m.bias.detach())
    other = WeightEMA(m, 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(m, 1.0)
