"""The `flux` backend: FLUX.1 through diffusers' `FluxPipeline`, from a local folder only.

Conditioning: T5 token states `[B, max_sequence_length, 4096]` and CLIP-L's pooled vector `[B, 768]`.
FLUX.1-dev is guidance-distilled: there is no classifier-free guidance; `sampler.guidance` (3.5 is the usual
value) is a model input, the guidance embedding, both when sampling and in stage two (the manifest records it;
stage two reads it from there). Latents are stored unpacked `[16, H/8, W/8]` like SD3's; the velocity function
packs them into 2x2 patches and builds the position ids (`base.flux_velocity`).

Sampling schedule: diffusers' FluxPipeline shifts its timesteps by exp(mu), mu growing linearly with the image's
token count (0.5 at 256 tokens, 1.15 at 4096). gdro's sampler uses a fixed `sampler.shift`; the same schedule
is `sampler.shift = exp(mu)`, e.g. 1.88 at 512 px (1024 tokens) and 3.16 at 1024 px (4096 tokens).
"""
from __future__ import annotations

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
