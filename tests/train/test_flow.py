"""The error parameterisations of the implicit reward, checked against an independent computation."""
import pytest
import torch

from pipeline.backends.base import Conditioning
from pipeline.flow import error_weight, flow_errors


def _linear_velocity(seed: int):
    """A fixed random 'model': v_hat = W x_t + b(t): enough to make every error non-trivial."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 12, generator=g, dtype=torch.float64) * 0.3

    def velocity(x, t, cond):
        flat = x.reshape(x.shape[0], -1) @ w.T
        return flat.reshape(x.shape) + t.reshape(-1, 1, 1, 1) * 0.5
    return velocity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_x0_weight_equals_the_data_prediction_error(seed):
    g = torch.Generator().manual_seed(100 + seed)
    x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64)
    vel = _linear_velocity(seed)
    cond = Conditioning(torch.zeros(5, 1, 1), torch.zeros(5, 1))
    v_err = flow_errors(vel, x0, eps, t, cond)
    # independently: predict x0 from x_t by the Euler step to t = 0 and measure it against the data
    for i in range(5):
        xt = (1 - t[i]) * x0[i] + t[i] * eps[i]
        v_hat = vel(xt[None], t[i:i + 1], cond)[0]
        x0_hat = xt - t[i] * v_hat
        want = ((x0_hat - x0[i]) ** 2).mean()
        got = v_err[i] * error_weight(t[i:i + 1], "x0")[0]
        assert torch.allclose(got.double(), want, rtol=1e-5), (got, want)


def test_v_weight_is_one_and_unknown_is_an_error():
    t = torch.tensor([0.1, 0.9])
    assert torch.equal(error_weight(t, "v"), torch.ones(2))
    with pytest.raises(ValueError, match="x0"):
        error_weight(t, "eps")
