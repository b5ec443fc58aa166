"""The `flux` backend: FLUX.1 through diffusers' `FluxPipeline`, from a local folder only.

Conditioning: T5 token states `[B, max_sequence_length, 4096]` and CLIP-L's pooled vector `[B, 768]`.
FLUX.1-dev is guidance-distilled: there is no classifier-free guidance; `sampler.guidance` (3.5 is the usual
value) is a model input, the guidance embedding, both when sampling and in stage two (the manifest records it;
stage two reads it from there). Latents are stored unpacked `[16, H/8, W/8]` like SD3's; the velocity function
packs them into 2x2 patches and builds the position ids (`base.flux_velocity`).

Sampling schedule: FluxPipeline's, which is not SD3's. It starts from sigmas = linspace(1, 1/N, N) (SD3's
pipeline spaces N timesteps evenly from the scheduler's shifted sigma_max to its sigma_min) and shifts them by
exp(mu), mu growing linearly with the image's token count (0.5 at 256 tokens, 1.15 at 4096, from the model's
scheduler config). `sampler.shift = 0` is exactly that; a `sampler.shift` > 0 replaces exp(mu) by a fixed
shift on the same sigmas (exp(mu) is 1.88 at 512 px, 1024 tokens, and 3.16 at 1024 px, 4096 tokens).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning
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
