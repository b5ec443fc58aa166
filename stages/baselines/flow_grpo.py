"""Flow-GRPO (arXiv 2505.05470), as yifan123/flow_grpo trains it, on gdro's components: per iteration, G SDE
trajectories per drawn prompt from the current policy with each step's Gaussian log-probability
(pipeline/sde.py), group-normalised advantages of the final images' rewards (clipped to train.adv_clip), then for
each minibatch of groups (online.updates of them) the PPO objective averaged over every step of the trajectory,
  mean over images and steps of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp - logp_old),
plus online.grpo_kl_beta x ||mean - mean_ref||^2 / (2 std_dev_t^2) (the KL of the steps' Gaussians to the frozen
reference's), one optimiser step per minibatch. The first minibatch sees the sampling policy itself: ratio = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import GdroError
from pipeline.losses import advantages
from pipeline.sampling import scheduled, uses_cfg
from pipeline.sde import sample_sde, sde_step, sigmas_of

from .common import Online, draw_prompts, encode, initial_noise, score


@dataclass
class Trajectories:
    iteration: int
    traj: torch.Tensor  # [steps + 1, n G, C, H, W]
    logps: torch.Tensor  # [steps, n G] under the sampling policy
    cond: object
    rewards: torch.Tensor  # [n, G]
    sigmas: list[float]


def collect(s: Online, iteration: int) -> Trajectories:
    if uses_cfg(s.backend, s.cfg.sampler):
        raise GdroError("the Flow-GRPO baseline samples without classifier-free guidance: set sampler.guidance=1")
    metas = draw_prompts(s, iteration)
    noise = initial_noise(s, iteration, len(metas))
    cond = encode(s, metas)
    sigmas = sigmas_of(scheduled(s.backend, s.cfg.sampler))
    gen = torch.Generator().manual_seed(s.cfg.online.seed * 1_000_003 + iteration)
    s.policy.eval()
    traj, logps = sample_sde(s.v(s.policy), noise, cond, sigmas, s.cfg.online.grpo_noise_level, gen)
    s.policy.train()
    return Trajectories(iteration, traj, logps, cond, score(s, traj[-1], metas), sigmas)


def minibatch_loss(s: Online, tr: Trajectories, rows: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The PPO loss of the images `rows` averaged over the steps (flow_grpo accumulates the steps' gradients), and
    its ratios."""
    o = s.cfg.online
    sig = tr.sigmas
    cond = tr.cond[rows]
    total, ratios = 0.0, []
    for j in range(len(sig) - 1):
        x, x_next = tr.traj[j][rows], tr.traj[j + 1][rows]
        t = torch.tensor([sig[j]])
        _, logp, mean, std = sde_step(s.v(s.policy)(x, t, cond), x, sig[j], sig[j + 1], sig[1], o.grpo_noise_level,
                                      prev=x_next)
        ratio = torch.exp(logp - tr.logps[j][rows])
        a = adv[rows]
        policy_loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - o.grpo_clip_range, 1 + o.grpo_clip_range)).mean()
        loss = policy_loss
        if o.grpo_kl_beta:
            with torch.no_grad():
                _, _, mean_ref, _ = sde_step(s.v(s.reference)(x, t, cond), x, sig[j], sig[j + 1], sig[1],
                                             o.grpo_noise_level, prev=x_next)
            kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std ** 2)
            loss = loss + o.grpo_kl_beta * kl.mean()
        total = total + loss
        ratios.append(ratio.detach())
    return total / (len(sig) - 1), {"ratio": torch.stack(ratios)}


def iterate(on_minibatch=None):
    """The iteration of `common.run`. `on_minibatch(k, info)` (tests) sees minibatch k's ratios [steps, images]."""
    def it(s: Online, iteration: int) -> dict:
        tr = collect(s, iteration)
        n, g = tr.rewards.shape
        adv, _ = advantages(tr.rewards, scope=s.cfg.train.adv_scope, clip=s.cfg.train.adv_clip)
        adv = adv.reshape(-1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(iteration))
        losses, max_dev = [], 0.0
        for k, groups in enumerate(order.chunk(s.cfg.online.updates)):
            rows = (groups.unsqueeze(1) * g + torch.arange(g)).reshape(-1)
            loss, info = minibatch_loss(s, tr, rows, adv)
            if on_minibatch is not None:
                on_minibatch(k, info)
            s.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.policy.parameters(), s.cfg.train.max_grad_norm)
            s.opt.step()
            losses.append(float(loss.detach()))
            max_dev = max(max_dev, float((info["ratio"] - 1).abs().max()))
        return {"loss": sum(losses) / len(losses), "max_ratio_dev": max_dev, "reward_mean": float(tr.rewards.mean())}

    return it
