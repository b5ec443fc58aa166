"""What the real (VAE latent-space) backends share: loading a diffusers pipeline folder strictly offline, the
device, the velocity on the backend's own transformer, and decoding.

Storage convention (the data contract's latents): x0 = (z - shift_factor) * scaling_factor, with z the VAE's
latent and both factors from `vae/config.json` (SD3.5: 0.0609 and 1.5305; FLUX.1: 0.1159 and 0.3611). Those are
the latents the transformer denoises (what diffusers' pipelines hand to the VAE after undoing the scaling), so
stage two trains on them directly and never needs the VAE. FLUX latents are stored unpacked, [C, H/8, W/8];
the 2x2 packing happens inside the velocity function.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import GdroError
from .base import Conditioning, spec_of, transformer_velocity

DECODE_BATCH = 8  # images per VAE decode call (a shard's latents are decoded in pieces)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per task or per rank
    return torch.device("cpu")


def check_model_folder(path: str | Path, pipeline_class: str, key: str = "model.path") -> Path:
    root = Path(path)
    if not root.is_dir():
        raise GdroError(f"{key}: {path} is not a local folder. Nothing is ever downloaded: fetch the weights "
                        f"yourself (e.g. `huggingface-cli download <repo> --local-dir <dir>`) and set {key} to that "
                        f"folder")
    for need in ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler"):
        if not (root / need).exists():
            raise GdroError(f"{key}: {root} lacks {need}; point {key} at a diffusers {pipeline_class} folder")
    return root


class LatentBackend:
    """A diffusers text-to-image pipeline seen through the backend interface (`base.ModelBackend`)."""

    name = ""
    pipeline_class = ""
    default_max_sequence_length = 256

    def __init__(self, pipe, *, latent_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int, guidance: float):
        self.pipe = pipe
        self.transformer = pipe.transformer.eval().requires_grad_(False)
        self.vae = pipe.vae.eval().requires_grad_(False)
        self.latent_shape = tuple(latent_shape)
        self.device, self.dtype = device, dtype
        self.max_sequence_length = max_sequence_length
        spec = spec_of(self.name)
        self.guidance_mode = spec.guidance_mode
        self.guidance = float(guidance)
        self._velocity = transformer_velocity  # the registry's velocity of the transformer's class
        vc = self.vae.config
        self.scaling_factor = float(vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device=None,
                        resolution: int = 0, max_sequence_length: int = 0, guidance: float = 1.0,
                        key: str = "model.path") -> LatentBackend:
        import diffusers

        root = check_model_folder(path, cls.pipeline_class, key)
        shape = spec_of(cls.name).latent_shape(str(root), resolution)
        try:
            # the VAE stays in float32: decoding costs little and fp16 VAEs overflow
            pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(
                root, local_files_only=True, dtype={"default": dtype, "vae": torch.float32})
        except (OSError, ValueError) as e:
            raise GdroError(f"{key}: cannot load {root} as a {cls.pipeline_class} offline: {e}") from None
        device = torch.device(device) if device is not None else default_device()
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, latent_shape=shape, device=device, dtype=dtype,
                   max_sequence_length=max_sequence_length or cls.default_max_sequence_length, guidance=guidance)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v_theta(x_t, t, c) with t in [0, 1] (1 = noise), computed on the backend's device, returned on x's."""
        g = self.guidance if self.guidance_mode == "embedded" else None
        v = self._velocity(self.transformer, x.to(self.device, self.dtype), t.to(self.device),
                           cond.to(self.device, self.dtype), guidance=g)
        return v.to(x.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Stored latents [N, C, h, w] -> uint8 images [N, H, W, 3] (diffusers' own post-processing)."""
        out = []
        for s in range(0, latents.shape[0], DECODE_BATCH):
            z = latents[s:s + DECODE_BATCH].to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
            img = self.vae.decode(z, return_dict=False)[0]
            img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            out.append((img * 255).round().astype(np.uint8))
        return np.concatenate(out)
