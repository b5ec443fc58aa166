"""The `geneval` reward: GenEval's rules on the output of an object detector you plug in.

GenEval (Ghosh et al. 2023) scores an image against its metadata line (`{"tag", "include": [{"class", "count",
"color"?, "position"?: [relation, group index]}], "exclude"?}`, the format `pipeline.prompt_files` reads) with a
Mask2Former detector trained on COCO and a CLIP colour classifier. No such detector installs from a package
registry (its weights come from the GenEval/mmdetection sites), so gdro ships the rules, not a detector:

    rollouts:
      rewards:
        geneval:
          detector: my_site.geneval_detector:make_detector   # module:function, importable on every node
          detector_params: {config: /models/mask2former/config.py, weights: /models/mask2former/model.pth}

`make_detector(**detector_params)` is called once and returns `detect(images) -> detections`: images are uint8
[N, H, W, 3] RGB; detections one list per image of dicts `{"label": COCO class name as GenEval's metadata spells
it, "box": [x0, y0, x1, y1] in pixels, "score": confidence in [0, 1], "color": one of GenEval's colour names
(red, orange, yellow, green, blue, purple, pink, brown, black, white) or None}`. A mask, if the detector has one,
is its own business: GenEval uses it to classify the colour (CLIP on the masked crop), which the plug-in does
before returning `color`. Wrapping the official `evaluate_images.py` detector amounts to returning its
`result[class]` boxes with the colour its `color_classification` gives.

The rules (GenEval's `evaluate_images.py`, the same `judge` the toy world's verifier runs, tested on its images):
detections with score > `threshold` (0.3; `counting_threshold` 0.9 for `counting` lines) count; every included
class must be found `count` times; a colour on `count` of them; a position relative to an earlier group by
GenEval's box rule (`relative_position`: centre offset less `position_threshold` x the two box sizes per axis,
normalised by the offset's length, beyond 0.5 on an axis); `exclude` caps a count. The reward is `partial`
credit (the toy verifier's, documented in `pipeline/toy/verifier.judge`) or `strict` (GenEval's all-correct,
0/1) by `score`; the other is returned in the info too.
"""
from __future__ import annotations

import importlib

import numpy as np

from ..errors import GdroError
from . import register_reward

KEY = "rollouts.rewards.geneval"


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """The relations of box A to box B, GenEval's `relative_position`: image y grows downwards."""
    a, b = np.asarray(box_a, np.float64).reshape(2, 2), np.asarray(box_b, np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def to_detections(found: list[dict], threshold: float):
    """A plug-in detector's dicts as the verifier's `Detection`s (label as the class), kept above `threshold`,
    most confident first."""
    from ..toy.verifier import Detection

    out = []
    for k, d in enumerate(found):
        try:
            label, box, score = str(d["label"]), [float(v) for v in d["box"]], float(d["score"])
        except (KeyError, TypeError, ValueError) as e:
            raise GdroError(f"{KEY}.detector: detection {k} is not {{'label', 'box': [x0, y0, x1, y1], 'score', "
                            f"'color'}} ({e!r}: {d!r:.200})") from None
        if len(box) != 4:
            raise GdroError(f"{KEY}.detector: detection {k} has a box of {len(box)} numbers, not [x0, y0, x1, y1]")
        if score > threshold:
            x0, y0, x1, y1 = box
            out.append((-score, k, Detection(label, d.get("color"), (x0 + x1) / 2, (y0 + y1) / 2,
                                             int(abs(x1 - x0) * abs(y1 - y0)), 1.0, 1.0, box=(x0, y0, x1, y1))))
    return [det for *_, det in sorted(out, key=lambda x: x[:2])]  # most confident first, as GenEval takes them


def judge_detections(found: list[dict], meta: dict, *, threshold: float = 0.3, counting_threshold: float = 0.9,
                     position_threshold: float = 0.1):
    """GenEval's verdict (strict, partial, failures) of one image's detections against its metadata."""
    from ..toy.verifier import judge

    if not isinstance(meta, dict) or not isinstance(meta.get("include"), list):
        raise GdroError(f"{KEY}: the prompt {meta.get('prompt') if isinstance(meta, dict) else meta!r} has no "
                        f"GenEval metadata ('include'); use a GenEval .jsonl prompt file")
    thr = counting_threshold if meta.get("tag") == "counting" else threshold

    def relation(rel, obj, ref):
        return rel in relative_position(obj.box, ref.box, position_threshold)

    return judge(to_detections(found, thr), meta, relation)


def _load_detector(detector: str, params: dict):
    if not detector:
        raise GdroError(f"{KEY}.detector is not set: GenEval needs an object detector, which gdro does not ship "
                        f"(none installs offline); give module:function of a factory returning detect(images), "
                        f"see pipeline/rewards/geneval.py")
    module, _, attr = detector.partition(":")
    if not attr:
        raise GdroError(f"{KEY}.detector: {detector!r} is not module:function")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise GdroError(f"{KEY}.detector: cannot import {detector} ({e})") from None
    return factory(**params)


@register_reward("geneval", version="1")
def geneval(detector: str = "", detector_params: dict | None = None, score: str = "partial",
            threshold: float = 0.3, counting_threshold: float = 0.9, position_threshold: float = 0.1):
    """GenEval's rules on a plug-in detector (module docstring)."""
    if score not in ("partial", "strict"):
        raise GdroError(f"{KEY}.score: {score!r}; use partial or strict")
    detect = _load_detector(detector, dict(detector_params or {}))

    def fn(images, prompts, metadata):
        found = detect(np.asarray(images))
        if len(found) != len(images):
            raise GdroError(f"{KEY}.detector: {detector} returned {len(found)} detection lists for {len(images)} "
                            f"images")
        verdicts = [judge_detections(list(f), m, threshold=threshold, counting_threshold=counting_threshold,
                                     position_threshold=position_threshold) for f, m in zip(found, metadata)]
        partial = np.array([v.partial for v in verdicts], np.float64)
        strict = np.array([float(v.strict) for v in verdicts], np.float64)
        return (partial if score == "partial" else strict), {"strict": strict, "partial": partial,
                                                             "failures": [v.failures for v in verdicts]}

    return fn
