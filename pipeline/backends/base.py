"""The model-backend interface shared by the toy model, SD3/SD3.5 and FLUX, and the registry of backends.

A backend is anything with these methods (a Protocol, not a base class). Stage one uses `encode_prompts`,
`sample` (through `pipeline.sampling`) and `decode`; stage two only the velocity on stored latents and
conditioning, so the training job never loads a text encoder or a VAE.

One registry entry per backend (`BackendSpec`) says everything the two stages need to know about it: how to
load the whole model (stage one, eval), which diffusers class its denoiser is (stage two loads only that), the
latent shape read from config files, how it takes guidance, and its verifier for evaluation if it has one. Each
backend file (`toy.py`, `sd3.py`, `flux.py`) registers its spec and the velocity function of each denoiser class
it brings; this module imports them by name on the first look-up. The velocity function is the one code path
for both stages: the backends' own `velocity` calls it on their transformer, and stage
two calls it on the model being trained (`velocity_fn`), so "policy error at step 0 == cached reference error"
holds for every backend by construction.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import GdroError

__all__ = [
    "BACKENDS",
    "BUILTIN",
    "DENOISERS",
    "BackendSpec",
    "Conditioning",
    "ModelBackend",
    "backend_from_config",
    "dataset_velocity",
    "denoiser_class",
    "latent_shape_of",
    "load_backend",
    "load_transformer",
    "read_model_config",
    "register_backend",
    "register_denoiser",
    "spec_of",
    "timesteps",
    "transformer_velocity",
    "unwrap",
    "vae_latent_shape",
    "velocity_fn",
]


@dataclass
class Conditioning:
    """Text conditioning as the transformer consumes it: token states and a pooled vector per prompt."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_embeds: torch.Tensor  # [B, P]

    def __getitem__(self, idx) -> Conditioning:
        return Conditioning(self.prompt_embeds[idx], self.pooled_embeds[idx])

    def repeat_interleave(self, n: int) -> Conditioning:
        return Conditioning(self.prompt_embeds.repeat_interleave(n, 0), self.pooled_embeds.repeat_interleave(n, 0))

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(self.prompt_embeds.to(*args, **kwargs), self.pooled_embeds.to(*args, **kwargs))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), torch.cat([c.pooled_embeds for c in items]))


class ModelBackend(Protocol):
    name: str
    latent_shape: tuple[int, int, int]
    transformer: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    guidance_mode: str  # "cfg": classifier-free guidance at sampling | "embedded": guidance is a model input

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


# ------------------------------------------------------------------------------------- velocity functions
def unwrap(module):
    """The diffusers model inside a DeepSpeed engine (`.module`); peft adapters live inside the model itself."""
    return getattr(module, "module", module)


def timesteps(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on x's device in `dtype` (default x's), one per sample of x."""
    t = t.to(device=x.device, dtype=dtype or x.dtype)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


# The velocity of each denoiser class: the one code path both stages take for a model of that class. Each
# backend file registers the velocity of the classes it brings (`register_denoiser`).
DENOISERS: dict[str, Callable[..., torch.Tensor]] = {}


def register_denoiser(cls: str, velocity: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`velocity(module, x, t, cond, *, guidance=None)` is v(x_t, t, c) of a diffusers `cls` model (or a DeepSpeed
    engine wrapping one), t in [0, 1] with t = 1 noise."""
    DENOISERS[cls] = velocity
    return velocity


def transformer_velocity(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
                         guidance: float | None = None) -> torch.Tensor:
    """v(x_t, t, c) of any registered denoiser, chosen by its diffusers class (the one a DeepSpeed engine wraps):
    the SD3 family, FLUX or the toy UNet. `guidance` is for guidance-embedded models only."""
    _load_builtins()
    name = type(unwrap(module)).__name__
    if name not in DENOISERS:
        raise GdroError(f"no registered backend uses a {name}; known: {', '.join(sorted(DENOISERS))}")
    return DENOISERS[name](module, x, t, cond, guidance=guidance)


# ------------------------------------------------------------------------------------------ the registry
def read_model_config(path: str | Path, sub: str, key: str = "model.path") -> dict:
    f = Path(path) / sub / "config.json"
    if not f.is_file():
        raise GdroError(f"{key}: {Path(path)} has no {sub}/config.json; point {key} at a local diffusers model "
                        f"folder (nothing is downloaded: fetch the weights yourself, e.g. `huggingface-cli download "
                        f"<repo> --local-dir <dir>`)")
    return json.loads(f.read_text())


def vae_latent_shape(path: str | Path, resolution: int, *, patch: int, default_latent_side: int,
                     key: str = "model.path") -> tuple[int, int, int]:
    """(C, H/f, W/f) of a square image of `resolution` px (0: the model's default) from vae/config.json."""
    vae = read_model_config(path, "vae", key)
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    res = resolution or default_latent_side * f
    if res % (f * patch):
        raise GdroError(f"model.resolution={res} must be a multiple of {f * patch} for this model (VAE factor {f} "
                        f"x patch {patch})")
    return (int(vae["latent_channels"]), res // f, res // f)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    load: Callable[..., ModelBackend]  # (path, **options) -> the whole model (stage one, eval)
    denoisers: tuple[str, ...]  # diffusers classes <path>/transformer may hold (all stage two loads); the
    # velocity of each is DENOISERS[class], for both stages
    latent_shape: Callable[[str, int], tuple[int, int, int]]  # (path, resolution) from configs, no weights
    guidance_mode: str  # "cfg" (classifier-free at sampling) | "embedded" (a model input, guidance-distilled)
    lora_pipeline: str  # the diffusers pipeline class whose LoRA format the export writes (see lora_format)
    verifier: Callable[[], Any] | None = None  # () -> the backend's own judge of its images for evaluation
    # (`pipeline.eval.fixed_noise.Verifier`: scores besides the rewards, grid frames); None for real models


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec,
                     velocities: dict[str, Callable[..., torch.Tensor]] | None = None) -> BackendSpec:
    """Register a backend and the velocity functions of the denoiser classes it brings (`register_denoiser`)."""
    BACKENDS[spec.name] = spec
    for cls, fn in (velocities or {}).items():
        register_denoiser(cls, fn)
    return spec


# The built-in backends, one module each (in this package): each registers its spec and its denoisers' velocity
# when imported. They are imported by name on the first look-up, so this registry imports none of them.
BUILTIN = ("toy", "sd3", "flux")


def _load_builtins() -> None:
    for name in BUILTIN:
        importlib.import_module(f"{__package__}.{name}")


def spec_of(name: str) -> BackendSpec:
    _load_builtins()
    if name not in BACKENDS:
        raise GdroError(f"model.backend: unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


# ------------------------------------------------------------------------------------------ entry points
def load_backend(name: str, path: str, **options) -> ModelBackend:
    """The whole model from a local folder. Options: dtype, device (None: the backend's choice), resolution (px,
    0 = the model's default), max_sequence_length (0 = the backend's default), guidance (the sampler's; used by
    guidance-embedded backends only)."""
    return spec_of(name).load(path, **options)


def backend_from_config(cfg, path: str | None = None) -> ModelBackend:
    """`load_backend` with everything an `ExperimentConfig` says about the model and the sampler."""
    m = cfg.model
    return load_backend(m.backend, path or m.path, dtype=getattr(torch, m.dtype), resolution=m.resolution,
                        max_sequence_length=m.max_sequence_length, guidance=cfg.sampler.guidance)


def latent_shape_of(name: str, path: str, resolution: int = 0) -> tuple[int, int, int]:
    """The latent shape a backend produces, read from its config files (no weights loaded)."""
    return tuple(spec_of(name).latent_shape(path, resolution))


def load_transformer(name: str, path: str, dtype: torch.dtype = torch.float32):
    """Only the denoiser, for stage two (no text encoder, no VAE), as the backend's diffusers class, with its
    parameters in `dtype` (the training precision).

    Each weight is read from the memory-mapped file and cast on its own (`low_cpu_mem_usage`), so a bf16 load
    never holds a float32 copy of the model. Floating buffers (SD3's position table) stay float32, as DeepSpeed
    keeps them when it casts the engine's module: a bf16 load computes what a float32 load cast by DeepSpeed
    computes."""
    import diffusers

    spec_of(name)  # an unknown backend is named first
    folder = Path(path) / "transformer"
    if not (folder / "config.json").is_file():
        raise GdroError(f"model.path: {folder} has no config.json; point model.path at a local model folder")
    cls = denoiser_class(name, path)
    model = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                    low_cpu_mem_usage=True)
    if dtype != torch.float32:
        _float32_buffers(model, folder)
    return model


def _float32_buffers(model: torch.nn.Module, folder: Path) -> None:
    """Floating buffers back to float32: persistent ones re-read from the weights files, others recast."""
    from safetensors import safe_open

    stored = set(model.state_dict())
    files = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            files.update(dict.fromkeys(h.keys(), f))
    for name, buf in list(model.named_buffers()):
        if not buf.is_floating_point() or buf.dtype == torch.float32:
            continue
        owner, _, leaf = name.rpartition(".")
        if name in stored and name in files:
            with safe_open(str(files[name]), framework="pt") as h:
                value = h.get_tensor(name).float()
        else:
            value = buf.float()
        model.get_submodule(owner).register_buffer(leaf, value, persistent=name in stored)


def denoiser_class(name: str, path: str) -> str:
    """The diffusers class of <path>/transformer (its config's `_class_name`), checked against the backend's."""
    spec = spec_of(name)
    cls = read_model_config(path, "transformer").get("_class_name", spec.denoisers[0])
    if cls not in spec.denoisers:
        raise GdroError(f"model.path: {Path(path) / 'transformer'} holds a {cls}; the {name!r} backend takes "
                        f"{' or '.join(spec.denoisers)}")
    return cls


def velocity_fn(name: str, *, guidance: float | None = None) -> Callable[..., torch.Tensor]:
    """`v(module, x, t, cond)` for backend `name`: what stage two calls on the model it trains. `guidance` is the
    sampler's guidance, passed to guidance-embedded models only (CFG models train without guidance, as DGPO)."""
    spec = spec_of(name)
    g = guidance if spec.guidance_mode == "embedded" else None

    def v(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        cls = type(unwrap(module)).__name__
        if cls not in spec.denoisers:
            raise GdroError(f"the {name!r} backend takes {' or '.join(spec.denoisers)}, not a {cls}")
        return DENOISERS[cls](module, x, t, cond, guidance=g)

    return v


def dataset_velocity(name: str, manifest: dict) -> Callable[..., torch.Tensor]:
    """`velocity_fn` for training on a dataset: refuses a backend other than the generator's, and takes the
    guidance the dataset was sampled with from its manifest."""
    made_by = manifest["generator"]["backend"]
    if made_by != name:
        raise GdroError(f"model.backend is {name!r}, but the dataset was generated by the {made_by!r} backend; "
                        f"train the model that generated it")
    return velocity_fn(name, guidance=manifest["sampler"]["guidance"])
