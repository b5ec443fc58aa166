"""Online DGPO and online DiffusionNFT: ODE rollouts from the current policy every iteration, then updates on
the forward process of those clean samples (one (t, eps) per group per update), through the loss family.

dgpo: the DGPO loop (arXiv 2510.08425): t ~ U[online.dgpo_t_min, online.dgpo_t_max], the frozen base as the
reference of the implicit rewards, online.dgpo_kl_beta x the velocity KL to it. nft: DiffusionNFT (arXiv
2509.16117): v_old is the model that sampled this iteration's data (a frozen snapshot of the policy taken at
collection), t ~ train.t_law over [train.t_min, train.t_max]; no reference, no KL.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pipeline.backends.base import Conditioning
from pipeline.flow import error_weight, flow_errors, nft_branch_errors, sample_t
from pipeline.losses import group_loss, kl_penalty, pairwise_accuracy
from pipeline.sampling import sample, uses_cfg

from .common import Online, draw_prompts, encode, initial_noise, score


@dataclass
class Rollouts:
    iteration: int
    metas: list[dict]
    noise: torch.Tensor  # [n G, C, H, W] the initial noise
    latents: torch.Tensor  # [n G, C, H, W] the clean samples, float32
    cond: Conditioning  # per image
    rewards: torch.Tensor  # [n, G]


def collect(s: Online, iteration: int) -> Rollouts:
    """G images per drawn prompt from the policy as it is now (deterministic ODE, sampler.*), scored."""
    metas = draw_prompts(s, iteration)
    noise = initial_noise(s, iteration, len(metas))
    cond = encode(s, metas)
    null = s.backend.encode_prompts([""]) if uses_cfg(s.backend, s.cfg.sampler) else None  # CFG, as stage one
    s.policy.eval()
    latents = torch.cat([sample(s.backend, noise[i:i + 64], cond[i:i + 64], s.cfg.sampler, null_cond=null)
                         for i in range(0, noise.shape[0], 64)])
    s.policy.train()
    return Rollouts(iteration, metas, noise, latents, cond, score(s, latents, metas))


def _draw(s: Online, n: int, gen: torch.Generator, method: str) -> torch.Tensor:
    o, t = s.cfg.online, s.cfg.train
    if method == "dgpo":
        return o.dgpo_t_min + (o.dgpo_t_max - o.dgpo_t_min) * torch.rand(n, generator=gen)
    return sample_t(n, gen, law=t.t_law, t_min=t.t_min, t_max=t.t_max)


def update(s: Online, ro: Rollouts, method: str, old: torch.nn.Module | None = None) -> dict:
    """online.updates optimiser steps on the rollouts; `old` is nft's v_old (the sampling model)."""
    t_cfg = s.cfg.train
    n, g = ro.rewards.shape
    shape = ro.latents.shape[1:]
    gen = torch.Generator().manual_seed(s.cfg.online.seed * 1_000_003 + ro.iteration)
    losses, accs = [], []
    for _ in range(s.cfg.online.updates):
        tt = _draw(s, n, gen, method)
        eps = torch.randn(n, *shape, generator=gen)
        t_g, eps_g = tt.repeat_interleave(g), eps.repeat_interleave(g, 0)
        err, v = flow_errors(s.v(s.policy), ro.latents, eps_g, t_g, ro.cond, return_velocity=True)
        with torch.no_grad():
            ref_err, v_ref = flow_errors(s.v(old if method == "nft" else s.reference), ro.latents, eps_g, t_g,
                                         ro.cond, return_velocity=True)
        if method == "nft":
            pos, neg = nft_branch_errors(v, v_ref, ro.latents, eps_g, t_g, t_cfg.nft_beta)
            out = group_loss("nft", pos.view(n, g), None, ro.rewards, beta=t_cfg.beta, adv_clip=t_cfg.adv_clip,
                             adv_scope=t_cfg.adv_scope, neg_err=neg.view(n, g), nft_beta=t_cfg.nft_beta)
            loss = out.loss
        else:
            w = error_weight(tt, t_cfg.error_param).unsqueeze(1)
            out = group_loss("dgpo", err.view(n, g) * w, ref_err.view(n, g) * w, ro.rewards, beta=t_cfg.beta,
                             adv_scope=t_cfg.adv_scope, adv_clip=t_cfg.adv_clip)
            loss = out.loss + s.cfg.online.dgpo_kl_beta * kl_penalty(v, v_ref)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.policy.parameters(), t_cfg.max_grad_norm)
        s.opt.step()
        losses.append(float(loss.detach()))
        accs.append(pairwise_accuracy(out.rho.detach(), ro.rewards))
    return {"loss": sum(losses) / len(losses), "implicit_acc": accs[-1], "reward_mean": float(ro.rewards.mean())}


def iterate(method: str, on_collect=None):
    """The iteration of `common.run` for dgpo or nft. `on_collect(s, rollouts)` (tests) sees each batch before
    the update."""
    def it(s: Online, iteration: int) -> dict:
        old = copy.deepcopy(s.policy).eval().requires_grad_(False) if method == "nft" else None
        ro = collect(s, iteration)
        if on_collect is not None:
            on_collect(s, ro)
        return update(s, ro, method, old)

    return it
