"""Labelled sample grids of a toy model: prompts down the side, seeds across, a green or red frame for the
verifier's strict verdict and the partial credit under each image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .prompts import KINDS
from .verifier import verify


def pick_prompts(metas: list[dict], per_kind: int) -> list[dict]:
    """The first `per_kind` distinct prompts of each kind, kinds in GenEval's order, then any other tags sorted."""
    out = []
    tags = {m["tag"] for m in metas}
    for kind in [k for k in KINDS if k in tags] + sorted(tags - set(KINDS)):
        seen: list[str] = []
        for m in metas:
            if m["tag"] == kind and m["prompt"] not in seen:
                seen.append(m["prompt"])
                out.append(m)
            if len(seen) == per_kind:
                break
    return out


def _framed_cell(ax, image: np.ndarray, meta: dict | None):
    """One grid cell: the image, no ticks, a green frame if it passes GenEval's strict rules, else red; grey
    (and no verdict) without the prompt's metadata to judge it by."""
    verdict = verify(image, meta)[0] if meta is not None else None
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#999999" if verdict is None else "#1a9850" if verdict.strict else "#d73027")
        spine.set_linewidth(2.5)
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


def sample_grid(model: str, path: Path, prompts: str, *, per_kind: int = 4, seeds: int = 4, steps: int = 16,
                guidance: float = 1.0) -> Path:
    from schemas.seeds import member_seed, noise_for

    from ..backends.toy import ToyBackend
    from ..prompts import load_prompts
    from ..sampling import SamplerConfig, sample

    backend = ToyBackend.from_pretrained(model)
    metas = pick_prompts(load_prompts(prompts), per_kind)
    noise = torch.stack([noise_for(member_seed(0, i, s), backend.latent_shape)
                         for i in range(len(metas)) for s in range(seeds)])
    cond = backend.encode_prompts([m["prompt"] for m in metas]).repeat_interleave(seeds)
    null = backend.encode_prompts([""])
    lat = sample(backend, noise, cond, SamplerConfig(steps=steps, guidance=guidance), null_cond=null)
    images = backend.decode(lat).reshape(len(metas), seeds, *backend.latent_shape[1:], 3)
    title = (f"{model}: {steps} Euler steps, guidance {guidance}\n"
             f"green frame = strict pass (GenEval rules), number = partial credit")
    return draw_grid(images, metas, path, title)


def draw_comparison(images: np.ndarray, row_labels: list[str], metas: list[dict], cell_text: list[list[str]],
                    path: Path, title: str, verdicts: bool = True) -> Path:
    """Models down the side (the reference first), prompts across with the same noise in each column:
    images uint8 [rows, cols, H, W, 3]; a green or red frame for the toy verifier's strict verdict (`verdicts`;
    grey without), `cell_text` above each image, the prompt under each column."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    # constrained layout leaves room for every cell's title and the prompts under the last row (tight_layout
    # let a row's titles overlap the row above once the square images had shrunk to fit the width)
    fig, axes = plt.subplots(rows, cols, figsize=(1.05 * cols + 1.6, 1.25 * rows + 1.0), squeeze=False,
                             layout="constrained")
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            _framed_cell(ax, images[r, c], metas[c] if verdicts else None)
            ax.set_title(cell_text[r][c], fontsize=6, pad=2)
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == rows - 1:
                text = metas[c]["prompt"].removeprefix("a photo of ")
                ax.set_xlabel("\n".join(textwrap.wrap(text, 16)), fontsize=6, labelpad=2)
    lines = textwrap.wrap(title, max(40, int(fig.get_figwidth() * 13)))  # a narrow grid wraps its title
    fig.suptitle("\n".join(lines), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
