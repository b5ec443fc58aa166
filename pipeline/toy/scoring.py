"""Score batches of toy images: per image verdicts, and GenEval's per-kind table (overall = mean over kinds)."""
from __future__ import annotations

import numpy as np

from .prompts import KINDS
from .verifier import verify


def score_images(images: np.ndarray, metas: list[dict]) -> dict[str, np.ndarray]:
    """images uint8 [N, H, W, 3] -> arrays of strict (0/1), partial and quality, one value per image."""
    strict, partial, quality = [], [], []
    for img, meta in zip(images, metas):
        verdict, parse = verify(img, meta)
        strict.append(float(verdict.strict))
        partial.append(verdict.partial)
        quality.append(parse.quality)
    return {"strict": np.array(strict), "partial": np.array(partial), "quality": np.array(quality)}


def kind_table(scores: dict[str, np.ndarray], kinds: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {kind: mean, ..., "overall": mean over the kinds present}} like GenEval's results table; GenEval's
    kinds in their order, then any other tags (`ocr`, `prompt`, ...) sorted."""
    kinds_arr = np.asarray(kinds)
    present = set(kinds_arr.tolist())
    order = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    table: dict[str, dict[str, float]] = {}
    for metric, values in scores.items():
        row = {k: float(values[kinds_arr == k].mean()) for k in order}
        row["overall"] = float(np.mean(list(row.values()))) if row else float("nan")
        table[metric] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))  # the kinds, then overall
    width = max(9, *(len(m) + 1 for m in table))
    head = f"{'metric':<{width}}" + "".join(f"{c[:11]:>12}" for c in cols)
    lines = [head] + [f"{m:<{width}}" + "".join(f"{row[c]:>12.3f}" for c in cols) for m, row in table.items()]
    return "\n".join(lines)
