"""Comparison grids of `gdro eval`: models down the side (the reference first), prompts across, the same noise in
each column; a frame per cell from the backend's verifier when it has one."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .tables import kind_order


def pick_prompts(metas: list[dict], per_kind: int) -> list[dict]:
    """The first `per_kind` distinct prompts of each kind, kinds in GenEval's order, then any other tags sorted."""
    out = []
    for kind in kind_order(m["tag"] for m in metas):
        seen: list[str] = []
        for m in metas:
            if m["tag"] == kind and m["prompt"] not in seen:
                seen.append(m["prompt"])
                out.append(m)
            if len(seen) == per_kind:
                break
    return out


def framed_cell(ax, image: np.ndarray, passed: bool | None) -> None:
    """One grid cell: the image, no ticks, a green frame if it passed, red if not, grey without a verdict."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#999999" if passed is None else "#1a9850" if passed else "#d73027")
        spine.set_linewidth(2.5)


def draw_comparison(images: np.ndarray, row_labels: list[str], metas: list[dict], cell_text: list[list[str]],
                    path: Path, title: str, passes: Callable[[np.ndarray, dict], bool] | None = None) -> Path:
    """Models down the side (the reference first), prompts across with the same noise in each column:
    images uint8 [rows, cols, H, W, 3]; a green or red frame for `passes(image, meta)` (the verifier's verdict;
    grey without one), `cell_text` above each image, the prompt under each column."""
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
            framed_cell(ax, images[r, c], passes(images[r, c], metas[c]) if passes is not None else None)
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
