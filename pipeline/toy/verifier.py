"""The toy world's verifier: GenEval's rules on a detector that parses the image instead of a neural detector.

Detection: nearest-colour segmentation against the palette, 4-connected components per colour, and a shape
label from the best template fit (the renderer's own `shape_mask`), IoU >= `MIN_IOU` or no label ("blob").
Scoring follows GenEval's ``evaluate_images.py``: every included class present ``count`` times, colours on the
found objects, positions relative to an earlier group, and ``exclude`` for exact counts. ``strict`` is
GenEval's all-correct; ``partial`` is our own partial credit for training (documented per rule below).

The out-of-domain ``quality`` score never looks at the prompt: the share of foreground pixels that belong to
well-formed objects, weighted by shape fidelity (template IoU) and colour purity. True renders score about
0.9; smears, specks, off-palette colours and malformed shapes pull it down.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .world import BACKGROUND, PALETTE, SHAPES, SQUARE_HALF, TRI_HEIGHT, shape_mask

MIN_AREA = 20  # pixels: smaller components are specks (the smallest true object, a triangle at r=4.5, has ~32)
MIN_IOU = 0.6  # template IoU below this: a blob with no shape (true renders fit at >= 0.79)
MAX_ASPECT = 1.5  # bbox elongation above this: no shape of ours (all are ~1:1; a 2:1 bar fits a circle at 0.61)
MIN_PURITY = 0.35  # mean colour purity below this: a colour smear, not an object
COLOR_TOL = 110.0  # RGB distance at which a pixel's colour purity reaches 0
REL_MARGIN = 2.0  # pixels: a position relation needs the centres this far apart on its axis
SCALES = (0.88, 0.94, 1.0, 1.06, 1.12)  # template sizes tried around the bbox-derived size

_COLOR_NAMES = ("background", *PALETTE)
_COLOR_RGB = np.array([BACKGROUND, *PALETTE.values()], np.float32)


@dataclass
class Detection:
    shape: str | None  # None: a blob matching no template
    color: str
    cx: float
    cy: float
    area: int
    iou: float  # best template IoU
    purity: float  # mean colour purity of its pixels
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 (a plug-in detector's, for `geneval`)


@dataclass
class Parse:
    detections: list[Detection]
    foreground: int  # pixels nearer a palette colour than the background
    quality: float


@dataclass
class Verdict:
    strict: bool
    partial: float
    failures: list[str] = field(default_factory=list)


def _fit_templates(comp: np.ndarray) -> tuple[str | None, float]:
    """Best (shape, IoU) over the shapes and a few sizes, each template placed from the component's bbox."""
    ys, xs = np.nonzero(comp)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    w, h = x1 - x0, y1 - y0
    elongated = max(w, h) / min(w, h) > MAX_ASPECT
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    area = comp.sum()
    best_shape, best_iou = None, 0.0
    for shape in SHAPES:
        if shape == "circle":
            r0 = (w + h) / 4
        elif shape == "square":
            r0 = (w + h) / 4 / SQUARE_HALF
        else:
            r0 = (w / 2 + h / TRI_HEIGHT) / 2
        for s in SCALES:
            r = r0 * s
            # the triangle's centre sits 0.1 r below the middle of its vertical extent
            tcy = cy - (TRI_HEIGHT * r) / 2 + r if shape == "triangle" else cy
            t = shape_mask(shape, cx, tcy, r, comp.shape[0])
            inter = np.logical_and(t, comp).sum()
            iou = inter / (area + t.sum() - inter)
            if iou > best_iou:
                best_shape, best_iou = shape, float(iou)
    return (best_shape if best_iou >= MIN_IOU and not elongated else None), best_iou


def parse(img: np.ndarray) -> Parse:
    """Detect objects in one uint8 [H, W, 3] image."""
    rgb = img.astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _COLOR_RGB[None, None], axis=-1)  # [H, W, 1 + colours]
    label = dist.argmin(-1)
    purity = np.clip(1.0 - dist.min(-1) / COLOR_TOL, 0.0, 1.0)
    fg = label > 0
    dets: list[Detection] = []
    good = 0.0
    for k in range(1, len(_COLOR_NAMES)):
        comps, n = ndimage.label(label == k)
        if n == 0:
            continue
        areas = np.bincount(comps.ravel(), minlength=n + 1)
        for c in range(1, n + 1):
            if areas[c] < MIN_AREA:
                continue
            comp = comps == c
            shape, iou = _fit_templates(comp)
            ys, xs = np.nonzero(comp)
            pur = float(purity[comp].mean())
            if pur < MIN_PURITY:
                shape = None
            good += iou * purity[comp].sum()
            dets.append(Detection(shape, _COLOR_NAMES[k], float(xs.mean() + 0.5), float(ys.mean() + 0.5),
                                  int(areas[c]), iou, pur))
    n_fg = int(fg.sum())
    return Parse(dets, n_fg, float(good / n_fg) if n_fg else 0.0)


def _relation_holds(rel: str, obj: Detection, ref: Detection) -> bool:
    dx, dy = obj.cx - ref.cx, obj.cy - ref.cy  # image y grows downwards
    return {"left of": dx < -REL_MARGIN, "right of": dx > REL_MARGIN,
            "above": dy < -REL_MARGIN, "below": dy > REL_MARGIN}[rel]


def judge(dets: list[Detection], meta: dict, relation=None) -> Verdict:
    """GenEval's rules (strict) and our partial credit for one parsed image and its metadata. The `geneval`
    reward (pipeline/rewards/geneval.py) runs this same function on a plug-in detector's boxes, with GenEval's
    box-based `relation(rel, obj, ref)`; the toy world compares centres (`_relation_holds`).

    Partial credit per included group, averaged: counting (with ``exclude``) 1 - min(|found - n|, n) / n;
    otherwise the share of the ``count`` found, and for a colour 1 if enough carry it, 0.5 if the class is there
    in another colour; for a position 1 if the relation holds, 0.5 if the object is there but misplaced or its
    reference is missing.
    """
    relation = relation or _relation_holds
    by_class: dict[str, list[Detection]] = {}
    for d in dets:
        if d.shape is not None:
            by_class.setdefault(d.shape, []).append(d)
    failures: list[str] = []
    scores: list[float] = []
    groups: list[list[Detection] | None] = []
    exclude = {e["class"]: int(e["count"]) for e in meta.get("exclude", [])}
    for req in meta["include"]:
        cls, n = req["class"], int(req["count"])
        found = by_class.get(cls, [])
        if cls in exclude:  # counting: exact number
            scores.append(1.0 - min(abs(len(found) - n), n) / n)
        else:
            scores.append(min(len(found), n) / n)
        if len(found) < n:
            failures.append(f"{cls}: found {len(found)} of {n}")
            groups.append(None)
            continue
        chosen = found[:n]
        if "color" in req:
            right = [d for d in found if d.color == req["color"]]
            if len(right) < n:
                failures.append(f"{cls}: colour {req['color']} on {len(right)} of {n}")
                scores[-1] = 0.5
                groups.append(None)
                continue
            chosen = right[:n]
        if "position" in req:
            rel, target = req["position"]
            ref = groups[target]
            ok = ref is not None and any(all(relation(rel, o, t) for t in ref) for o in found)
            if not ok:
                failures.append(f"{cls}: not {rel} {meta['include'][target]['class']}")
                scores[-1] = 0.5
                groups.append(None)
                continue
        groups.append(chosen)
    for cls, limit in exclude.items():
        have = len(by_class.get(cls, []))
        if have >= limit:
            failures.append(f"{cls}: found {have}, expected fewer than {limit}")
    return Verdict(strict=not failures, partial=float(np.mean(scores)), failures=failures)


def extra_objects(dets: list[Detection], meta: dict) -> int:
    """Objects beyond those the prompt names (every detection, blobs included, against the sum of the included
    counts). GenEval's rules ignore them: "a circle" drawn as two circles passes, and each extra object is one
    more chance at a colour or a relation, so a reward built on those rules can be gamed by drawing more. Out of
    domain: no reward reads it, `gdro eval` reports the share of images without any (`no_extra`)."""
    return max(0, len(dets) - sum(int(req["count"]) for req in meta["include"]))


def verify(img: np.ndarray, meta: dict) -> tuple[Verdict, Parse]:
    p = parse(img)
    return judge(p.detections, meta), p
