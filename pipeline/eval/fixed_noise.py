"""Sampling a prompt set with fixed noise and scoring it, shared by pre-training checks, `gdro eval`, selection
during training and sample grids: the noise of (line i, member m) is `noise_for(member_seed(base_seed, i, m))`,
so every model sees the same noise."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from schemas.seeds import member_seed, noise_for

from ..sampling import SamplerConfig, sample


class Verifier(Protocol):
    """A backend's own judge of its images against their prompt metadata (`BackendSpec.verifier`; the toy world's
    GenEval verifier): evaluation scores its metrics besides the registered rewards and frames grid cells by it."""

    metrics: tuple[str, ...]  # the per-image scores `score` returns
    win_metric: str  # the score whose win rate the console reports
    win_label: str  # how the console names it
    frame_legend: str  # what a grid's title says of the frames

    def score(self, images: np.ndarray, metas: list[dict]) -> dict[str, np.ndarray]: ...

    def passes(self, image: np.ndarray, meta: dict) -> bool: ...


def verifier_of(backend: str) -> Verifier | None:
    """The registered backend's verifier, None when it has none (a real model is scored by rewards only)."""
    from ..backends.base import spec_of

    make = spec_of(backend).verifier
    return make() if make is not None else None


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


def eval_rewards(cfg) -> dict:
    """The registered rewards `gdro eval` and training-time selection score besides the backend's verifier, built
    once: `eval.rewards`, each with its parameters from `rollouts.rewards.<name>` (the same local weights as
    stage one; {} when stage one did not use it). For a backend without a verifier (a real model) the target and
    the out-of-domain scores must be among them."""
    from ..errors import GdroError
    from ..rewards import make_reward

    e = cfg.eval
    if verifier_of(cfg.model.backend) is None:
        for name, key in ((e.target, "eval.target"), *((o, "eval.out_of_domain") for o in e.out_of_domain)):
            if name not in e.rewards:
                raise GdroError(f"{key}: {name!r} is not scored for the {cfg.model.backend} backend (strict, partial "
                                f"and quality are the toy world's verifier); name rewards of eval.rewards, e.g. "
                                f"--set 'eval.rewards=[ocr, aesthetic]' --set eval.target=ocr --set "
                                f"'eval.out_of_domain=[aesthetic]'")
    return {name: make_reward(name, cfg.rollouts.rewards.get(name, {})) for name in e.rewards}


def score_set(images: np.ndarray, metas: list[dict], rewards: dict | None = None, *,
              verifier: Verifier | None = None) -> dict[str, np.ndarray]:
    """Per-image scores: the `verifier`'s (the toy world's strict, partial and out-of-domain quality), then every
    built reward in `rewards` ({name: Reward}, from `eval_rewards`) not already scored, one array each."""
    scores = verifier.score(images, metas) if verifier is not None else {}
    for name, reward in (rewards or {}).items():
        if name not in scores:
            values, _ = reward.fn(images, [m["prompt"] for m in metas], metas)
            scores[name] = np.asarray(values, np.float64)
    return scores


def evaluate_backend(backend, metas: list[dict], sampler: SamplerConfig, *, base_seed: int, seeds: int,
                     batch: int, rewards: dict | None = None, verifier: Verifier | None = None,
                     progress=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample every prompt line `seeds` times with the fixed noise and score every image: (images, scores)."""
    images = sample_prompt_set(backend, metas, sampler, base_seed=base_seed, seeds=seeds, batch=batch,
                               progress=progress)
    return images, score_set(images, [m for m in metas for _ in range(seeds)], rewards, verifier=verifier)
