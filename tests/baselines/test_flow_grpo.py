"""Flow-GRPO's defining pieces: the SDE step's log-probability is the Gaussian's, and the ratio is 1 on the first
minibatch (the policy is the one that sampled), not on the next."""
import math

import pytest
import torch
from scipy.stats import norm

from pipeline.sde import sample_sde, sde_step


def test_log_prob_is_the_hand_computed_gaussian_in_1d():
    # sigma 0.5 -> 0.25, a = 0.7, x = 0.3, v = -0.8, x_next = 0.1. By hand:
    #   std_dev_t = 0.7 sqrt(0.5 / 0.5) = 0.7;  dt = -0.25
    #   mean = 0.3 (1 + 0.49 (-0.25) / 1.0) + (-0.8) (1 + 0.49 x 0.5 / 1.0) (-0.25) = 0.26325 + 0.249 = 0.51225
    #   s = 0.7 sqrt(0.25) = 0.35
    x, v, nxt = (torch.tensor([[c]]) for c in (0.3, -0.8, 0.1))
    _, logp, mean, std = sde_step(v, x, 0.5, 0.25, 0.9, 0.7, prev=nxt)
    assert float(std) == pytest.approx(0.7)
    assert float(mean) == pytest.approx(0.51225, abs=1e-6)
    assert float(logp) == pytest.approx(norm(loc=0.51225, scale=0.35).logpdf(0.1), abs=1e-5)


def test_log_prob_at_pure_noise_uses_the_next_sigma_and_averages_elements():
    # sigma = 1 (std would be infinite): std_dev_t = a sqrt(1 / (1 - sigma_max)) with sigma_max = 0.75 -> 1.4
    x = torch.tensor([[0.2, -1.0]])
    v = torch.tensor([[0.5, 0.1]])
    nxt = torch.tensor([[0.0, -0.9]])
    _, logp, _, std = sde_step(v, x, 1.0, 0.75, 0.75, 0.7, prev=nxt)
    assert float(std) == pytest.approx(1.4)
    dt = -0.25
    m = [xi * (1 + 1.96 / 2 * dt) + vi * (1 + 0.0) * dt for xi, vi in ((0.2, 0.5), (-1.0, 0.1))]
    s = 1.4 * math.sqrt(0.25)
    want = (norm(m[0], s).logpdf(0.0) + norm(m[1], s).logpdf(-0.9)) / 2
    assert float(logp) == pytest.approx(want, abs=1e-5)


def test_a_drawn_trajectory_is_scored_as_it_was_drawn():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1, 2, 2, generator=gen)

    def velocity(x, t, c):
        return -0.5 * x + t

    traj, logps = sample_sde(velocity, noise, None, [1.0, 0.6, 0.3, 0.0], 0.7, torch.Generator().manual_seed(1))
    for j, (sig, nxt) in enumerate(((1.0, 0.6), (0.6, 0.3), (0.3, 0.0))):
        _, lp, _, _ = sde_step(velocity(traj[j], torch.tensor([sig]), None), traj[j], sig, nxt, 0.6, 0.7,
                               prev=traj[j + 1])
        assert torch.allclose(lp, logps[j], atol=1e-6)


def test_ratio_is_one_on_the_first_minibatch_only(online_cfg):
    from stages.baselines import flow_grpo
    from stages.baselines.common import setup

    s = setup(online_cfg("online.method=flow-grpo", "online.updates=2", "online.grpo_clip_range=0.2"))
    seen = {}
    flow_grpo.iterate(on_minibatch=lambda k, info: seen.setdefault(k, info["ratio"]))(s, 1)
    assert (seen[0] - 1).abs().max() < 1e-5  # the policy that sampled: exp(logp - logp_old) = 1
    assert (seen[1] - 1).abs().max() > 1e-4  # after one update it is another policy
