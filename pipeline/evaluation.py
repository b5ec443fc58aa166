"""Sampling a prompt set with fixed noise, shared by pre-training checks, `gdro eval` and sample grids: the
noise of (line i, member m) is `noise_for(member_seed(base_seed, i, m))`, so every model sees the same noise."""
from __future__ import annotations

import numpy as np
import torch

from schemas.seeds import member_seed, noise_for

from .sampling import SamplerConfig, sample


@torch.no_grad()
def sample_prompt_set(backend, metas: list[dict], sampler: SamplerConfig, *, base_seed: int = 0, seeds: int = 1,
                      batch: int = 100, progress=None) -> np.ndarray:
    """uint8 images [len(metas) * seeds, H, W, 3], member-major within each line."""
    null = backend.encode_prompts([""]) if sampler.guidance != 1.0 else None
    flat = [(i, m) for i in range(len(metas)) for m in range(seeds)]
    out = []
    for start in range(0, len(flat), batch):
        chunk = flat[start:start + batch]
        noise = torch.stack([noise_for(member_seed(base_seed, i, m), backend.latent_shape) for i, m in chunk])
        cond = backend.encode_prompts([metas[i]["prompt"] for i, _ in chunk])
        out.append(backend.decode(sample(backend, noise, cond, sampler, null_cond=null)))
        if progress is not None:
            progress.update(len(chunk))
    return np.concatenate(out)
