"""The toy world: 32x32 RGB scenes of coloured shapes on black, drawn by code.

One shape function (`shape_mask`) serves both the renderer and the verifier's template fit, so a true render
and the template the verifier compares it with can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # image side in pixels
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Saturated colours, pairwise >= 130 apart in RGB (0..255) so nearest-colour segmentation is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
    "white": (240, 240, 240),
}
COLORS = tuple(PALETTE)
BACKGROUND = (0, 0, 0)
RADIUS_RANGE = (4.5, 6.0)  # object "radius" in pixels: large enough for a 4-px patch model to learn shapes
GAP = 2.0  # minimum empty pixels between objects, so connected components never merge
SQUARE_HALF = 0.85  # square half-side as a fraction of r (area close to the circle's)
TRI_HEIGHT = 1.8  # triangle height as a multiple of r; apex at cy - r, base at cy + 0.8 r, half-base r


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float  # centre in pixel-edge coordinates (0..SIZE)
    cy: float
    r: float


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    return xs, ys


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of one shape, sampled at pixel centres."""
    xs, ys = _grid(size)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = SQUARE_HALF * r
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        top = cy - r
        depth = ys - top  # 0 at the apex, TRI_HEIGHT * r at the base
        return (depth >= 0) & (depth <= TRI_HEIGHT * r) & (np.abs(xs - cx) <= depth / TRI_HEIGHT)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def extent(shape: str, r: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) reach of a shape from its centre, used for placement and template fitting."""
    if shape == "square":
        h = SQUARE_HALF * r
        return h, h, h, h
    if shape == "triangle":
        return r, r, r, (TRI_HEIGHT - 1.0) * r
    return r, r, r, r


def render(objects: list[Obj] | tuple[Obj, ...], size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] image: objects painted in order on the background."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.r, size)] = PALETTE[o.color]
    return img


def to_unit(img_u8: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1] (the model's pixel space)."""
    return (img_u8.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def from_unit(x: np.ndarray) -> np.ndarray:
    """float CHW (or NCHW) in [-1, 1] -> uint8 HWC (or NHWC), clipping."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(x, -3, -1)
