"""`timed`: a scorer of set cost, for measuring how stage one overlaps rewards with sampling (`make bench`).

Its score is the mean pixel value in [0, 1]; each call sleeps `seconds_per_image` per image first. Sleeping
releases the GIL, as onnxruntime (RapidOCR) and torch do while they compute, so on worker threads its cost
overlaps sampling the way a real CPU reward's does on a machine with cores to spare for it.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import GdroError
from . import register_reward


@register_reward("timed", version="1", per_image=True)
def timed(seconds_per_image: float = 0.01):
    """The mean pixel value after sleeping `seconds_per_image` per image (module docstring)."""
    if seconds_per_image < 0:
        raise GdroError(f"rollouts.rewards.timed.seconds_per_image must be >= 0, got {seconds_per_image}")

    def fn(images, prompts, metadata):
        time.sleep(seconds_per_image * len(images))
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0, {}

    return fn
