"""The model-backend interface shared by the toy model, SD3/SD3.5 and FLUX, and the registry of backends.

A backend is anything with these methods (a Protocol, not a base class). Stage one uses `encode_prompts`,
`sample` (through `pipeline.sampling`) and `decode`; stage two only `velocity` on stored latents and
conditioning, so the training job never loads a text encoder or a VAE.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..errors import GdroError

__all__ = ["Conditioning", "GdroError", "ModelBackend", "register_backend", "load_backend", "BACKENDS"]


@dataclass
class Conditioning:
    """Text conditioning as the transformer consumes it: token states and a pooled vector per prompt."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_embeds: torch.Tensor  # [B, P]

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.prompt_embeds[idx], self.pooled_embeds[idx])

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(self.prompt_embeds.repeat_interleave(n, 0), self.pooled_embeds.repeat_interleave(n, 0))

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.prompt_embeds.to(*args, **kwargs), self.pooled_embeds.to(*args, **kwargs))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), torch.cat([c.pooled_embeds for c in items]))


class ModelBackend(Protocol):
    name: str
    latent_shape: tuple[int, int, int]
    transformer: torch.nn.Module

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def transformer_velocity(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """v(x_t, t, c) of an SD3-family transformer (or a DeepSpeed engine wrapping one); t in [0, 1], t = 1 noise.
    diffusers' SD3 transformer takes timesteps in [0, 1000]."""
    t = t.to(device=x.device, dtype=x.dtype)
    t = t.expand(x.shape[0]) if t.numel() == 1 else t
    return module(hidden_states=x, timestep=t * 1000.0, encoder_hidden_states=cond.prompt_embeds,
                  pooled_projections=cond.pooled_embeds, return_dict=False)[0]


BACKENDS: dict[str, Callable[..., ModelBackend]] = {}


def register_backend(name: str):
    def deco(fn):
        BACKENDS[name] = fn
        return fn

    return deco


def load_backend(name: str, path: str, **kwargs) -> ModelBackend:
    if name not in BACKENDS:
        raise GdroError(f"model.backend: unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](path, **kwargs)


def latent_shape_of(name: str, path: str) -> tuple[int, int, int]:
    """The latent shape a backend produces, read from its config files (no weights loaded)."""
    if name == "toy":
        from .toy import ToyBackend

        return ToyBackend.latent_shape
    raise GdroError(f"model.backend: unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")


@register_backend("toy")
def _toy(path: str, **kwargs) -> ModelBackend:
    from .toy import ToyBackend

    return ToyBackend.from_pretrained(path, **kwargs)


def load_transformer(name: str, path: str):
    """Only the denoiser, for stage two (no text encoder, no VAE)."""
    from diffusers import SD3Transformer2DModel

    if name not in BACKENDS:
        raise GdroError(f"model.backend: unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    folder = Path(path) / "transformer"
    if not (folder / "config.json").is_file():
        raise GdroError(f"model.path: {folder} has no config.json; point model.path at a local model folder")
    return SD3Transformer2DModel.from_pretrained(folder, local_files_only=True)
