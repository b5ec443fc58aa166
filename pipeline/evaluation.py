"""Sampling a prompt set with fixed noise and scoring it, shared by pre-training checks, `gdro eval`, selection
during training and sample grids: the noise of (line i, member m) is `noise_for(member_seed(base_seed, i, m))`,
so every model sees the same noise."""
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


def score_set(images: np.ndarray, metas: list[dict], rewards: list[str] = ()) -> dict[str, np.ndarray]:
    """Per-image scores of toy images: the verifier's strict, partial and (out-of-domain) quality, plus every
    named reward of the registry (`pipeline.rewards`), one array each."""
    from .rewards import make_reward
    from .toy.scoring import score_images

    scores = score_images(images, metas)
    for name in rewards:
        if name not in scores:
            values, _ = make_reward(name).fn(images, [m["prompt"] for m in metas], metas)
            scores[name] = np.asarray(values, np.float64)
    return scores


def evaluate_backend(backend, metas: list[dict], sampler: SamplerConfig, *, base_seed: int, seeds: int,
                     batch: int, rewards: list[str] = (), progress=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample every prompt line `seeds` times with the fixed noise and score every image: (images, scores)."""
    images = sample_prompt_set(backend, metas, sampler, base_seed=base_seed, seeds=seeds, batch=batch,
                               progress=progress)
    return images, score_set(images, [m for m in metas for _ in range(seeds)], rewards)
