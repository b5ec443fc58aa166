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

from ..errors import GdroError
from .base import BackendSpec, Conditioning, read_model_config, register_backend, timesteps, vae_latent_shape
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


def sd3_velocity(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
                 guidance: float | None = None) -> torch.Tensor:
    """v(x_t, t, c) of an SD3-family transformer (or a DeepSpeed engine wrapping one); t in [0, 1], t = 1 noise.
    diffusers' SD3 transformer takes timesteps in [0, 1000], fed as diffusers' SD3 pipeline feeds them: 1000 t in
    float32 (a bf16 t rounds 1000 t by up to ~2). No guidance input: SD3 guides by CFG at sampling."""
    return module(hidden_states=x, timestep=timesteps(t, x, torch.float32) * 1000.0,
                  encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_embeds,
                  return_dict=False)[0]


def sd3_latent_shape(path: str, resolution: int) -> tuple[int, int, int]:
    tr = read_model_config(path, "transformer")
    shape = vae_latent_shape(path, resolution, patch=tr["patch_size"], default_latent_side=tr["sample_size"])
    if shape[1] // tr["patch_size"] > tr.get("pos_embed_max_size", 10**9):
        raise GdroError(f"model.resolution: {shape[1]} latent pixels exceed the transformer's pos_embed_max_size "
                        f"({tr['pos_embed_max_size']} patches of {tr['patch_size']})")
    return shape


register_backend(BackendSpec("sd3", SD3Backend.from_pretrained, ("SD3Transformer2DModel",), sd3_latent_shape,
                             "cfg", "StableDiffusion3Pipeline"), {"SD3Transformer2DModel": sd3_velocity})
