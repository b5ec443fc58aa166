"""The `sd3` backend: Stable Diffusion 3 / 3.5 (Medium, Large) through diffusers' `StableDiffusion3Pipeline`,
from a local folder only.

Conditioning is SD3's own: the token states of CLIP-L and CLIP-G (concatenated, zero-padded to T5's width)
followed by T5-XXL's, `[B, 77 + max_sequence_length, 4096]`, and the two CLIP pooled vectors concatenated,
`[B, 2048]`. The unconditional embedding for classifier-free guidance is the encoding of the empty prompt,
exactly what the pipeline uses for `negative_prompt=""`. Guidance is applied at sampling only
(`sampler.guidance`, recorded in the manifest); stage two trains the conditional velocity without guidance,
as the DGPO code does (its policy and reference velocities are conditional-only).
"""
from __future__ import annotations

import torch

from .base import Conditioning
from .latent import LatentBackend


class SD3Backend(LatentBackend):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256  # the pipeline's default T5 length (the DGPO code uses 128)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                       device=self.device, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return Conditioning(prompt_embeds=embeds, pooled_embeds=pooled)
