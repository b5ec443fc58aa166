"""The `flux` backend: FLUX.1 through diffusers' `FluxPipeline`, from a local folder only.

Conditioning: T5 token states `[B, max_sequence_length, 4096]` and CLIP-L's pooled vector `[B, 768]`.
FLUX.1-dev is guidance-distilled: there is no classifier-free guidance; `sampler.guidance` (3.5 is the usual
value) is a model input, the guidance embedding, both when sampling and in stage two (the manifest records it;
stage two reads it from there). Latents are stored unpacked `[16, H/8, W/8]` like SD3's; the velocity function
packs them into 2x2 patches and builds the position ids (`flux_velocity`, below).

Sampling schedule: FluxPipeline's, which is not SD3's. It starts from sigmas = linspace(1, 1/N, N) (SD3's
pipeline spaces N timesteps evenly from the scheduler's shifted sigma_max to its sigma_min) and shifts them by
exp(mu), mu growing linearly with the image's token count (0.5 at 256 tokens, 1.15 at 4096, from the model's
scheduler config). `sampler.shift = 0` is exactly that; a `sampler.shift` > 0 replaces exp(mu) by a fixed
shift on the same sigmas (exp(mu) is 1.88 at 512 px, 1024 tokens, and 3.16 at 1024 px, 4096 tokens).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import GdroError
from .base import BackendSpec, Conditioning, read_model_config, register_backend, timesteps, unwrap, vae_latent_shape
from .latent import LatentBackend


class FluxBackend(LatentBackend):
    name = "flux"
    pipeline_class = "FluxPipeline"
    default_max_sequence_length = 512  # FLUX.1-dev's (schnell uses 256)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                            max_sequence_length=self.max_sequence_length)
        return Conditioning(prompt_embeds=embeds, pooled_embeds=pooled)

    def sampling_scheduler(self, cfg):
        """FluxPipeline's schedule for `cfg.steps` steps (see the module docstring); `cfg` a SamplerConfig."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from ..sampling import make_scheduler

        sigmas = np.linspace(1.0, 1.0 / cfg.steps, cfg.steps)
        if cfg.shift:
            sched = make_scheduler(cfg)
            sched.set_timesteps(sigmas=sigmas)
            return sched
        conf = self.pipe.scheduler.config
        sched = make_scheduler(cfg, conf)
        _, h, w = self.latent_shape
        mu = calculate_shift((h // 2) * (w // 2), conf.get("base_image_seq_len", 256),
                             conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                             conf.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        return sched


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's [B, (H/2)(W/2), 4C] sequence of 2x2 patches (diffusers' `_pack_latents`)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = seq.shape
    return seq.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_velocity(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
                  guidance: float | None = None) -> torch.Tensor:
    """v(x_t, t, c) of a FLUX transformer on unpacked latents [B, C, H, W] (as stored): packs 2x2 patches, builds
    the image/text position ids, passes the distilled guidance as the model's guidance embedding (FLUX.1-dev; a
    model without one, like FLUX.1-schnell, takes none) and unpacks the result. FLUX takes t in [0, 1]."""
    b, _, h, w = x.shape
    ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=x.dtype)
    g = None
    if unwrap(module).config.guidance_embeds:
        if guidance is None:
            raise GdroError("this FLUX model is guidance-distilled: it needs sampler.guidance (e.g. 3.5 for "
                            "FLUX.1-dev) as its guidance input")
        g = torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
    out = module(hidden_states=pack_latents(x), timestep=timesteps(t, x), guidance=g,
                 encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_embeds,
                 img_ids=ids.reshape(-1, 3), txt_ids=txt_ids, return_dict=False)[0]
    return unpack_latents(out, h, w)


def flux_latent_shape(path: str, resolution: int) -> tuple[int, int, int]:
    read_model_config(path, "transformer")
    return vae_latent_shape(path, resolution, patch=2, default_latent_side=128)  # FluxPipeline.default_sample_size


register_backend(BackendSpec("flux", FluxBackend.from_pretrained, ("FluxTransformer2DModel",), flux_latent_shape,
                             "embedded", "FluxPipeline"), {"FluxTransformer2DModel": flux_velocity})
