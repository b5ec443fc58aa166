"""Rewards as factories resolved by name: `make_reward(name, **params)` returns
``fn(images, prompts, metadata) -> (scores, info)`` with images uint8 [N, H, W, 3], one float per image.

Heavy imports live inside each factory. A user scorer is `module:function` (a factory taking the params).
Register a new reward with `@register_reward("name", version="1")`: one function, no edits elsewhere. A
`describe(**params) -> params` given to `register_reward` resolves what the manifest records without loading a
model (the OCR engine actually used and its version, say). Every reward's parameters are set under
`rollouts.rewards.<name>` and named `rollouts.rewards.<name>.<param>` in its errors.

The registered rewards: `toy_*` (below), `ocr` (`ocr.py`), `clip_score`, `aesthetic`, `pickscore` (`clip.py`),
`geneval` (`geneval.py`).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GdroError

RewardFn = Callable[[np.ndarray, list[str], list[dict]], tuple[np.ndarray, dict[str, Any]]]


@dataclass
class Reward:
    name: str
    version: str
    params: dict[str, Any]
    fn: RewardFn

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "params": self.params}


_FACTORIES: dict[str, tuple[Callable[..., RewardFn], str]] = {}
_DESCRIBE: dict[str, Callable[..., dict]] = {}


def register_reward(name: str, *, version: str = "1", describe: Callable[..., dict] | None = None):
    def deco(factory):
        _FACTORIES[name] = (factory, version)
        if describe is not None:
            _DESCRIBE[name] = describe
        return factory

    return deco


def known_rewards() -> list[str]:
    return sorted(_FACTORIES)


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, None when it is not installed (what manifests record)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def reward_identity(name: str, params: dict[str, Any] | None = None) -> dict:
    """What the manifest records of a reward, without building it (no model is loaded)."""
    _factory, version = _resolve(name)
    return {"name": name, "version": version, "params": _described(name, dict(params or {}))}


def _described(name: str, params: dict[str, Any]) -> dict[str, Any]:
    if name not in _DESCRIBE:
        return params
    try:
        return _DESCRIBE[name](**params)
    except TypeError as e:
        raise GdroError(f"rollouts.rewards.{name}: bad parameters {params} ({e})") from None


def make_reward(name: str, params: dict[str, Any] | None = None) -> Reward:
    params = dict(params or {})
    factory, version = _resolve(name)
    try:
        fn = factory(**params)
    except TypeError as e:
        raise GdroError(f"rollouts.rewards.{name}: bad parameters {params} ({e})") from None
    return Reward(name, version, _described(name, params), fn)


def _resolve(name: str):
    if ":" in name:  # a user scorer: module:function
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise GdroError(f"rollouts.rewards.{name}: cannot import the user scorer ({e})") from None
        return factory, str(getattr(factory, "version", "user"))
    if name in _FACTORIES:
        return _FACTORIES[name]
    raise GdroError(f"rollouts.rewards.{name}: unknown reward; known: {', '.join(known_rewards())}, "
                    f"or module:function for your own scorer")


# ----------------------------------------------------------------------------------------------- toy world
@register_reward("toy_geneval", version="1")
def toy_geneval():
    """GenEval rules on the toy world: score = partial credit; info['strict'] = GenEval's all-correct."""
    from ..toy.verifier import verify

    def fn(images, prompts, metadata):
        verdicts = [verify(img, meta)[0] for img, meta in zip(images, metadata)]
        return (np.array([v.partial for v in verdicts]),
                {"strict": np.array([float(v.strict) for v in verdicts])})

    return fn


@register_reward("toy_strict", version="1")
def toy_strict():
    """GenEval's strict all-correct (0/1) on the toy world."""
    from ..toy.verifier import verify

    def fn(images, prompts, metadata):
        return np.array([float(verify(img, meta)[0].strict) for img, meta in zip(images, metadata)]), {}

    return fn


@register_reward("toy_quality", version="1")
def toy_quality():
    """Out-of-domain image quality of toy scenes (shape fidelity x colour purity); never looks at the prompt."""
    from ..toy.verifier import parse

    def fn(images, prompts, metadata):
        return np.array([parse(img).quality for img in images]), {}

    return fn


@register_reward("toy_color_area", version="1")
def toy_color_area():
    """DELIBERATELY EXPLOITABLE, for the reward-hacking demonstration (`make hack-demo`, docs/evaluation.md):
    the share of pixels whose nearest palette colour is one the prompt names (any palette colour if it names
    none). A model pleases it by painting larger blobs of the right colours, whatever their shape or number."""
    from ..toy.verifier import _COLOR_NAMES, _COLOR_RGB

    def fn(images, prompts, metadata):
        rgb = np.asarray(images, np.float32)
        label = np.linalg.norm(rgb[..., None, :] - _COLOR_RGB, axis=-1).argmin(-1)  # [N, H, W]; 0 = background
        out = []
        for lab, meta in zip(label, metadata):
            named = {o["color"] for o in (meta or {}).get("include", []) if o.get("color")}
            ids = [i for i, c in enumerate(_COLOR_NAMES) if c in named] if named else range(1, len(_COLOR_NAMES))
            out.append(float(np.isin(lab, list(ids)).mean()))
        return np.array(out), {}

    return fn


# the other registered rewards: their modules import nothing heavy at the top
from . import clip, geneval, ocr  # noqa: F401
