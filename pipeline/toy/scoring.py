"""Score batches of toy images: per image verdicts (tabled by `pipeline.eval.tables`), true renders' scores, and
the checks a toy base model must pass."""
from __future__ import annotations

import numpy as np

from .verifier import extra_objects, verify


def score_images(images: np.ndarray, metas: list[dict]) -> dict[str, np.ndarray]:
    """images uint8 [N, H, W, 3] -> arrays of strict (0/1), partial, quality and no_extra (1: no object beyond
    those the prompt names, `verifier.extra_objects`), one value per image."""
    strict, partial, quality, no_extra = [], [], [], []
    for img, meta in zip(images, metas):
        verdict, parse = verify(img, meta)
        strict.append(float(verdict.strict))
        partial.append(verdict.partial)
        quality.append(parse.quality)
        no_extra.append(float(extra_objects(parse.detections, meta) == 0))
    return {"strict": np.array(strict), "partial": np.array(partial), "quality": np.array(quality),
            "no_extra": np.array(no_extra)}


def true_render_scores(metas: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """The verifier's scores of true renders of each prompt line (scene of line i drawn with seed (seed, i)):
    the world's own ceiling, against which a model's out-of-domain quality is read."""
    from .prompts import sample_scene
    from .world import render

    images = np.stack([render(sample_scene(m, np.random.default_rng([seed, i]))) for i, m in enumerate(metas)])
    return score_images(images, metas)


# What a toy base model must be to make post-training measurable: able to draw (single objects, quality near
# true renders) but unreliable in composition (strict accuracy well below 1, with room above it).
BASE_TARGETS = {"strict": (0.25, 0.55), "single_object": 0.85, "quality_ratio": 0.8}


def base_target_checks(table: dict[str, dict[str, float]], true_quality: float) -> list[tuple[str, float, bool]]:
    """(description, value, met) for each of BASE_TARGETS, from a model's kind table and the true renders'
    mean quality on the same prompt lines."""
    lo, hi = BASE_TARGETS["strict"]
    strict, single = table["strict"]["overall"], table["strict"].get("single_object", float("nan"))
    ratio = table["quality"]["overall"] / true_quality
    return [(f"strict in [{lo}, {hi}]", strict, lo <= strict <= hi),
            (f"single-object strict >= {BASE_TARGETS['single_object']}", single,
             single >= BASE_TARGETS["single_object"]),
            (f"quality / true renders' >= {BASE_TARGETS['quality_ratio']}", ratio,
             ratio >= BASE_TARGETS["quality_ratio"])]
