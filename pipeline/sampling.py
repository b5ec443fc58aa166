"""Deterministic ODE sampling from given noise with any diffusers flow-matching scheduler, optional CFG.

Convention everywhere in gdro (SD3's): x_t = (1 - t) x0 + t eps, t = 1 is pure noise, v = eps - x0, and a
transformer timestep is 1000 t.
"""
from __future__ import annotations

import torch

from .backends.base import Conditioning, ModelBackend
from .config import SamplerConfig
from .errors import GdroError


def make_scheduler(cfg: SamplerConfig, config: dict | None = None):
    """`sampler.scheduler` with `sampler.shift`, or with a model's own scheduler `config` (its shift rules)."""
    import diffusers

    cls = getattr(diffusers, cfg.scheduler, None)
    if cls is None or not cfg.scheduler.startswith("FlowMatch"):
        raise GdroError(f"sampler.scheduler: {cfg.scheduler!r} is not a diffusers flow-matching scheduler "
                        f"(try FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler)")
    if config is not None:
        return cls.from_config(config)
    return cls(num_train_timesteps=1000, shift=cfg.shift)


def scheduled(backend: ModelBackend, cfg: SamplerConfig):
    """A scheduler with `sampler.steps` timesteps set: the backend's own schedule when it has one (FLUX's is
    FluxPipeline's, `FluxBackend.sampling_scheduler`), else StableDiffusion3Pipeline's (`sampler.shift` on the
    scheduler's default spacing)."""
    own = getattr(backend, "sampling_scheduler", None)
    if own is not None:
        return own(cfg)
    if cfg.shift == 0:
        raise GdroError(f"sampler.shift=0 (the model's own, resolution-dependent shift) is for the flux backend; "
                        f"set sampler.shift for {getattr(backend, 'name', 'this backend')} (SD3.5: 3.0)")
    sched = make_scheduler(cfg)
    sched.set_timesteps(cfg.steps)
    return sched


def uses_cfg(backend: ModelBackend, cfg: SamplerConfig) -> bool:
    """True if sampling guides by classifier-free guidance (so the empty prompt's embedding is needed); False for
    no guidance and for guidance-distilled models (FLUX.1-dev), which take the guidance as an input instead."""
    return cfg.guidance != 1.0 and getattr(backend, "guidance_mode", "cfg") == "cfg"


@torch.no_grad()
def sample(backend: ModelBackend, noise: torch.Tensor, cond: Conditioning, cfg: SamplerConfig,
           null_cond: Conditioning | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE from `noise` (t = 1) to t = 0; returns latents in float32.

    CFG models: v = v_u + guidance (v_c - v_u) with `null_cond` the empty prompt's embedding. Guidance-embedded
    models: the backend was loaded with the guidance (`load_backend(..., guidance=)`) and one pass suffices."""
    if getattr(backend, "guidance_mode", "cfg") == "embedded" and backend.guidance != cfg.guidance:
        raise GdroError(f"sampler.guidance={cfg.guidance}, but the {backend.name} backend was loaded with guidance "
                        f"{backend.guidance}; load it with the sampler's guidance")
    guided = uses_cfg(backend, cfg)
    if guided and null_cond is None:
        raise GdroError("sampler.guidance != 1 needs the unconditional embedding (null_cond)")
    sched = scheduled(backend, cfg)
    x = noise.to(backend.device, torch.float32)
    if null_cond is not None and null_cond.prompt_embeds.shape[0] == 1:
        null_cond = Conditioning(null_cond.prompt_embeds.expand(x.shape[0], -1, -1),
                                 null_cond.pooled_embeds.expand(x.shape[0], -1))
    dtype = backend.dtype
    for t in sched.timesteps:
        tt = (t / 1000.0).reshape(1)
        if guided:
            both = Conditioning.cat([null_cond.to(dtype), cond.to(dtype)])
            v_u, v_c = backend.velocity(torch.cat([x, x]).to(dtype), tt, both).float().chunk(2)
            v = v_u + cfg.guidance * (v_c - v_u)
        else:
            v = backend.velocity(x.to(dtype), tt, cond.to(dtype)).float()
        x = sched.step(v, t, x).prev_sample
    return x
