"""Flow-GRPO's SDE sampler (arXiv 2505.05470, Eq. 9): the probability-flow ODE turned into an SDE with the same
marginals, whose every Euler-Maruyama step is a Gaussian, so a trajectory has a log-probability under the policy.
Used by the Flow-GRPO baseline only (stages/baselines/); the product samples with the ODE (pipeline/sampling.py).

With sigma the scheduler's noise level at a step (SD3's convention: x_t = (1 - t) x0 + t eps, t = sigma) and
dt = sigma_next - sigma < 0, the step from x with velocity v is N(mean, s^2) with
  std_dev_t = a sqrt(sigma / (1 - sigma))          (a = noise_level; sigma = 1 uses the next sigma below 1)
  mean = x (1 + std_dev_t^2 dt / (2 sigma)) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
  s = std_dev_t sqrt(-dt)
and its log-probability is the Gaussian log-density averaged over the elements (as flow_grpo averages it).
"""
from __future__ import annotations

import math

import torch

from .backends.base import Conditioning


def sde_step(v: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float, sigma_max: float,
             noise_level: float, *, prev: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """One SDE step: (x_next, log_prob [B], mean, std_dev_t). Given `prev` (a stored x_next) it is scored, not
    drawn; else x_next = mean + s * noise."""
    v, x = v.float(), x.float()
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_for_std = torch.as_tensor(sigma_max if sigma == 1.0 else sigma, dtype=torch.float32)
    std_dev_t = torch.sqrt(sigma_t / (1 - sigma_for_std)) * noise_level
    dt = float(sigma_next) - float(sigma)
    mean = x * (1 + std_dev_t ** 2 / (2 * sigma_t) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma_t) / (2 * sigma_t)) * dt
    scale = std_dev_t * math.sqrt(-dt)
    if prev is None:
        prev = mean + scale * noise.float()
    logp = -((prev.detach().float() - mean) ** 2) / (2 * scale ** 2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))
    return prev, logp.flatten(1).mean(1), mean, std_dev_t


def sigmas_of(sched) -> list[float]:
    """The noise levels of a scheduler with its timesteps set (`sampling.scheduled`), the final 0 included."""
    return [float(s) for s in sched.sigmas]


@torch.no_grad()
def sample_sde(velocity, noise: torch.Tensor, cond: Conditioning, sigmas: list[float], noise_level: float,
               generator: torch.Generator):
    """A trajectory from `noise` (sigma = 1) to the data: (latents [steps + 1, B, ...], log_probs [steps, B]).
    `velocity(x, t [1], cond)`; the step noises come from `generator` (on the CPU)."""
    x = noise.float()
    traj, logps = [x], []
    sigma_max = sigmas[1]
    for i in range(len(sigmas) - 1):
        v = velocity(x, torch.tensor([sigmas[i]]), cond)
        z = torch.randn(x.shape, generator=generator).to(x.device)
        x, logp, _, _ = sde_step(v, x, sigmas[i], sigmas[i + 1], sigma_max, noise_level, noise=z)
        traj.append(x)
        logps.append(logp)
    return torch.stack(traj), torch.stack(logps)
