"""Prompts of GenEval's six kinds for the toy world, in GenEval's own metadata format.

Every prompt is a dict ``{"tag", "include", ["exclude"], "prompt"}`` exactly as GenEval's
``evaluation_metadata.jsonl``; the verifier reads the same dicts, so a real GenEval metadata file and the toy
files go through one code path. The toy space is enumerated, split per kind into disjoint train and test pools
by a seeded shuffle, and the shipped files cycle through each pool so every kind has the same weight.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..eval.tables import GENEVAL_KINDS
from .verifier import verify
from .world import COLORS, GAP, PLURALS, RADIUS_RANGE, SHAPES, SIZE, Obj, extent, render

KINDS = GENEVAL_KINDS  # the toy world draws all of GenEval's kinds
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SPLIT_SEED = 20260101
TEST_FRACTION = 0.3


def _obj(shape: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    d: dict = {"class": shape, "count": count}
    if color is not None:
        d["color"] = color
    if position is not None:
        d["position"] = position
    return d


def enumerate_kind(kind: str) -> list[dict]:
    """Every prompt of one kind in the toy world, in a fixed order."""
    out: list[dict] = []
    if kind == "single_object":
        for s in SHAPES:
            out.append({"tag": kind, "include": [_obj(s)], "prompt": f"a photo of a {s}"})
    elif kind == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            out.append({"tag": kind, "include": [_obj(a), _obj(b)], "prompt": f"a photo of a {a} and a {b}"})
    elif kind == "counting":
        for s, n in itertools.product(SHAPES, NUMBERS):
            out.append({"tag": kind, "include": [_obj(s, n)], "exclude": [_obj(s, n + 1)],
                        "prompt": f"a photo of {NUMBERS[n]} {PLURALS[s]}"})
    elif kind == "colors":
        for c, s in itertools.product(COLORS, SHAPES):
            out.append({"tag": kind, "include": [_obj(s, color=c)], "prompt": f"a photo of a {c} {s}"})
    elif kind == "position":
        for (ref, moved), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
            out.append({"tag": kind, "include": [_obj(ref), _obj(moved, position=[rel, 0])],
                        "prompt": f"a photo of a {moved} {rel} a {ref}"})
    elif kind == "color_attr":
        for (ca, sa), (cb, sb) in itertools.permutations(itertools.product(COLORS, SHAPES), 2):
            if sa != sb:  # GenEval pairs two different object classes
                out.append({"tag": kind, "include": [_obj(sa, color=ca), _obj(sb, color=cb)],
                            "prompt": f"a photo of a {ca} {sa} and a {cb} {sb}"})
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return out


def split_pools(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, test) pools: per kind, a seeded shuffle, the first share (at least one) held out."""
    train, test = [], []
    for kind in KINDS:
        pool = enumerate_kind(kind)
        random.Random(f"{seed}-{kind}").shuffle(pool)
        n_test = max(1, round(test_fraction * len(pool)))
        test += pool[:n_test]
        train += pool[n_test:]
    return train, test


def balanced_list(pool: list[dict], n: int) -> list[dict]:
    """n prompts, kinds interleaved round-robin, each kind cycling through its own pool."""
    by_kind = {k: [p for p in pool if p["tag"] == k] for k in KINDS}
    cursors = dict.fromkeys(KINDS, 0)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        out.append(by_kind[kind][cursors[kind] % len(by_kind[kind])])
        cursors[kind] += 1
    return out


def write_prompt_files(folder: Path, n_train: int = 2000, n_test: int = 300) -> tuple[Path, Path]:
    train, test = split_pools()
    paths = []
    for name, pool, n in (("toy_train", train, n_train), ("toy_test", test, n_test)):
        path = Path(folder) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in balanced_list(pool, n)))
        paths.append(path)
    return paths[0], paths[1]


def all_prompts() -> list[dict]:
    return [p for k in KINDS for p in enumerate_kind(k)]


# ---------------------------------------------------------------------------------------------------------
# True scenes for a prompt: what the pre-training data and the verifier's "true render" check are made of.

def _fits(box: tuple[float, float, float, float], boxes: list) -> bool:
    x0, x1, y0, y1 = box
    if x0 < 0.5 or y0 < 0.5 or x1 > SIZE - 0.5 or y1 > SIZE - 0.5:
        return False
    return all(x1 + GAP <= b[0] or b[1] + GAP <= x0 or y1 + GAP <= b[2] or b[3] + GAP <= y0 for b in boxes)


def _box(shape: str, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    left, right, up, down = extent(shape, r)
    return cx - left, cx + right, cy - up, cy + down


def _relation_ok(rel: str, box: tuple, ref: tuple) -> bool:
    """The moved object lies wholly on the named side of the reference (its box does not straddle it)."""
    if rel == "left of":
        return box[1] + GAP <= ref[0]
    if rel == "right of":
        return box[0] >= ref[1] + GAP
    if rel == "above":
        return box[3] + GAP <= ref[2]
    if rel == "below":
        return box[2] >= ref[3] + GAP
    raise ValueError(f"unknown relation {rel!r}; known: {', '.join(RELATIONS)}")


def sample_scene(meta: dict, rng: np.random.Generator, max_tries: int = 500) -> list[Obj]:
    """A random scene that satisfies the prompt: every included object, unnamed colours drawn at random."""
    wanted = []
    for item in meta["include"]:
        for _ in range(int(item["count"])):
            wanted.append((item["class"], item.get("color"), item.get("position")))
    for _attempt in range(50):
        objs: list[Obj] = []
        boxes: list = []
        ok = True
        for shape, color, position in wanted:
            color = color or COLORS[int(rng.integers(len(COLORS)))]
            for _ in range(max_tries):
                r = float(rng.uniform(*RADIUS_RANGE))
                cx, cy = (float(v) for v in rng.uniform(r + 1.0, SIZE - r - 1.0, size=2))
                box = _box(shape, cx, cy, r)
                if _fits(box, boxes) and (position is None or _relation_ok(position[0], box, boxes[position[1]])):
                    objs.append(Obj(shape, color, cx, cy, r))
                    boxes.append(box)
                    break
            else:
                ok = False
                break
        if ok:
            return objs
    raise RuntimeError(f"could not place the scene for {meta['prompt']!r}")


# ---------------------------------------------------------------------------------------------------------
# Noisy captions: the pre-training pairs whose caption describes another scene than the one drawn, as web
# captions often do. The perturbation keeps every object drawable and changes one compositional fact.

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PERTURBED_KINDS = ("two_object", "counting", "colors", "position", "color_attr")  # single objects stay clean
# The kinds the shipped base is pre-trained with noisy captions on: presence, counts and relations, the facts an
# ODE sampler can get wrong while drawing every object crisply. Colour noise is left out: a caption whose colour
# is often wrong makes the per-pixel colour multimodal, and a 16-step sampler then paints averaged, off-palette
# colours (the previous base: colour right on 27 % of its samples where its captions were right on 50 %).
NOISY_KINDS = ("two_object", "counting", "position")


@dataclass(frozen=True)
class CaptionNoise:
    """How a noisy pair's scene differs from its caption, per kind (`perturb`). A two-sided setting keeps the
    caption's fact the likeliest at any rate < 1 - 1/k (k the number of alternatives); a one-sided one makes a
    single wrong fact the likeliest above rate 1/2, which guidance at sampling then amplifies."""
    relation: str = "other"  # other: any other side | opposite: the opposite side (one-sided)
    # either: n - 1 or n + 1 | up: n + 1, n - 1 at the world's largest count (one-sided) | down: n - 1 (one-sided:
    # an omission, the count kind's analogue of a dropped object)
    count: str = "either"
    color: str = "other"  # other: any other colour | next: the next colour of the palette (one-sided)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"relation": ("other", "opposite"), "count": ("either", "up", "down"), "color": ("other", "next")}

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} noise must be {' or '.join(allowed)}, got {getattr(self, name)!r}")


DEFAULT_NOISE = CaptionNoise()


def perturb(meta: dict, rng: np.random.Generator, how: CaptionNoise = DEFAULT_NOISE) -> dict:
    """The metadata of a scene that differs from `meta` in one compositional fact (its caption is not changed:
    the caller pairs the original caption with a render of this scene). Single-object prompts come back as
    they are. Per kind: two objects -> one of them missing; a count n -> n - 1 or n + 1 (within 1..4;
    ``how.count="up"``: n + 1, or n - 1 at the world's largest count; ``"down"``: n - 1); a colour -> another colour
    (``how.color="next"``: the palette's next one); a relation -> one of the three others
    (``how.relation="opposite"``: its opposite); two coloured objects -> their colours swapped (one
    recoloured if they share a colour)."""
    kind = meta["tag"]
    inc = [dict(o) for o in meta["include"]]
    if kind == "two_object":
        inc = [inc[int(rng.integers(2))]]
    elif kind == "counting":
        n = int(inc[0]["count"])
        options = [m for m in (n - 1, n + 1) if 1 <= m <= max(NUMBERS)]
        if how.count == "up":  # one-sided: the caption's count is no longer the likeliest at rates > 1/2
            options = options[-1:]
        elif how.count == "down":  # one-sided the other way (every count of the world is >= 2)
            options = options[:1]
        inc[0]["count"] = options[int(rng.integers(len(options)))]
        return {**meta, "include": inc, "exclude": [{**inc[0], "count": inc[0]["count"] + 1}]}
    elif kind == "colors":
        i = COLORS.index(inc[0]["color"])
        others = [COLORS[(i + 1) % len(COLORS)]] if how.color == "next" else [c for c in COLORS if c != COLORS[i]]
        inc[0]["color"] = others[int(rng.integers(len(others)))]
    elif kind == "position":
        rel = inc[1]["position"][0]
        if how.relation == "opposite":  # at rate 1/2 the caption then says nothing about the side (the first base)
            rel = OPPOSITE[rel]
        else:  # any other side: the caption's relation stays the likeliest one at any rate < 3/4
            others = [r for r in RELATIONS if r != rel]
            rel = others[int(rng.integers(len(others)))]
        inc[1]["position"] = [rel, inc[1]["position"][1]]
    elif kind == "color_attr":
        if inc[0]["color"] != inc[1]["color"]:
            inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
        else:  # swapping equal colours changes nothing: recolour one object instead
            j = int(rng.integers(2))
            others = [c for c in COLORS if c != inc[j]["color"]]
            inc[j]["color"] = others[int(rng.integers(len(others)))]
    elif kind != "single_object":
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return {**meta, "include": inc}


def noisy_scene(meta: dict, rng: np.random.Generator, how: CaptionNoise = DEFAULT_NOISE,
                max_tries: int = 100) -> list[Obj]:
    """A scene of `perturb(meta)` that the verifier rejects for `meta` itself: a noisy pair's image never
    happens to satisfy its caption. Only a relation can (drawn on another side, it may still hold on the
    caption's axis); every other perturbation changes a fact the verifier counts, so only those are re-checked."""
    for _ in range(max_tries):
        scene = sample_scene(perturb(meta, rng, how), rng)
        if meta["tag"] != "position" or not verify(render(scene), meta)[0].strict:
            return scene
    raise RuntimeError(f"no perturbed scene of {meta['prompt']!r} fails its caption in {max_tries} tries")
