"""Rectified-flow quantities shared by stage one (the reference-error cache) and stage two (the losses).

x_t = (1 - t) x0 + t eps, target v = eps - x0, error L = mean over (C, H, W) of (v_theta(x_t, t, c) - v)^2.
One function computes L for both stages, so "policy error at step 0 == cached reference error" holds by
construction, not by two implementations agreeing.
"""
from __future__ import annotations

import torch

from .backends.base import Conditioning


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def flow_errors(velocity, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                return_velocity: bool = False):
    """Per-sample flow-matching error [B] (and optionally the predicted velocity) of `velocity(x_t, t, cond)`.

    x0, eps: [B, C, H, W]; t: [B] or [1] in [0, 1]. Computed in the dtype of x0; the mean in float32.
    """
    t = t.to(x0.device).expand(x0.shape[0]) if t.numel() == 1 else t.to(x0.device)
    xt = interpolate(x0, eps, t)
    v = velocity(xt, t, cond)
    err = (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
    return (err, v) if return_velocity else err


def sample_t(n: int, generator: torch.Generator, *, law: str, t_min: float, t_max: float, shift: float = 1.0):
    """n timesteps in [t_min, t_max]: uniform, or logit-normal(0, 1) (SD3's law), optionally shifted
    (t -> shift t / (1 + (shift - 1) t), which moves mass towards noise for shift > 1)."""
    if law == "uniform":
        u = torch.rand(n, generator=generator)
    elif law == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown t law {law!r}")
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return t_min + (t_max - t_min) * u


NFT_WEIGHT_MIN = 1e-5  # DiffusionNFT's floor of the adaptive weight


def nft_branch_errors(v_policy: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                      t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionNFT's (arXiv 2509.16117) per-sample errors [B] of its implicit positive and negative policies,
    v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta, on the same x_t: the x0 error of
    x0_hat = x_t - t v, divided by its own detached mean absolute value (adaptive weighting, floored at 1e-5)."""
    t = t.to(x0.device).expand(x0.shape[0]) if t.numel() == 1 else t.to(x0.device)
    xt = interpolate(x0.float(), eps.float(), t)
    tt = t.float().reshape(-1, *([1] * (x0.dim() - 1)))
    v_old = v_old.detach().float()
    v_policy = v_policy.float()

    def err(v):
        d = (xt - tt * v) - x0.float()
        w = d.detach().double().abs().flatten(1).mean(1).clamp(min=NFT_WEIGHT_MIN).float()
        return d.pow(2).flatten(1).mean(1) / w

    return err(beta * v_policy + (1 - beta) * v_old), err((1 + beta) * v_old - beta * v_policy)


ERROR_PARAMS = ("v", "x0")


def error_weight(t: torch.Tensor, param: str) -> torch.Tensor:
    """Per-sample factor turning the velocity error into the error of another parameterisation at the same x_t.

    "v": the rectified-flow training loss itself (weight 1). "x0": the data-prediction error of DGPO's Eq. 17,
    ||x0_hat - x0||^2 with x0_hat = x_t - t v_hat, which equals t^2 ||v_hat - v||^2. The v error weights the
    x0 error by 1/t^2, so near-data draws (t -> 0, where members differ only in fine texture) dominate the
    implicit rewards; the x0 error lets the composition-deciding, noisy end of the path carry the preference.
    """
    if param == "v":
        return torch.ones_like(t, dtype=torch.float32)
    if param == "x0":
        return t.float() ** 2
    raise ValueError(f"unknown error parameterisation {param!r}; known: {', '.join(ERROR_PARAMS)}")
