"""Labelled sample grids of a toy model: prompts down the side, seeds across, a green or red frame for the
verifier's strict verdict and the partial credit under each image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..eval.grids import framed_cell, pick_prompts
from .verifier import verify


def _framed_cell(ax, image: np.ndarray, meta: dict | None):
    """One grid cell framed by the verifier's strict verdict (GenEval's rules): green pass, red fail; grey (and no
    verdict) without the prompt's metadata to judge it by."""
    verdict = verify(image, meta)[0] if meta is not None else None
    framed_cell(ax, image, None if verdict is None else verdict.strict)
    return verdict


def draw_grid(images: np.ndarray, metas: list[dict], path: Path, title: str) -> Path:
    """images uint8 [rows, cols, H, W, 3] for metas[rows]; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 3.2, 1.25 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            verdict = _framed_cell(ax, images[r, c], metas[r])
            ax.set_xlabel(f"{verdict.partial:.2f}", fontsize=7, labelpad=1)
            if c == 0:
                text = metas[r]["prompt"].removeprefix("a photo of ")
                ax.set_ylabel(f"{metas[r]['tag']}\n{text}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(model: str, path: Path, prompts: str, sampler, *, per_kind: int = 4, seeds: int = 4) -> Path:
    from schemas.seeds import member_seed, noise_for

    from ..backends.toy import ToyBackend
    from ..prompt_files import load_prompts
    from ..sampling import sample

    backend = ToyBackend.from_pretrained(model)
    metas = pick_prompts(load_prompts(prompts), per_kind)
    noise = torch.stack([noise_for(member_seed(0, i, s), backend.latent_shape)
                         for i in range(len(metas)) for s in range(seeds)])
    cond = backend.encode_prompts([m["prompt"] for m in metas]).repeat_interleave(seeds)
    null = backend.encode_prompts([""])
    lat = sample(backend, noise, cond, sampler, null_cond=null)
    images = backend.decode(lat).reshape(len(metas), seeds, *backend.latent_shape[1:], 3)
    title = (f"{model}: {sampler.steps} Euler steps, guidance {sampler.guidance}\n"
             f"green frame = strict pass (GenEval rules), number = partial credit")
    return draw_grid(images, metas, path, title)
