"""Rewards as factories resolved by name: `make_reward(name, **params)` returns
``fn(images, prompts, metadata) -> (scores, info)`` with images uint8 [N, H, W, 3], one float per image.

Heavy imports live inside each factory. A user scorer is `module:function` (a factory taking the params).
Register a new reward with `@register_reward("name", version="1")`: one function, no edits elsewhere. A
`describe(**params) -> params` given to `register_reward` resolves what the manifest records without loading a
model (the OCR engine actually used and its version, say). `per_image=True` declares that an image's score
does not depend on the other images of the call (a loop over images, not a batched model), so stage one may
split a shard's call over `rollouts.reward_workers` threads with the same scores (a user scorer declares it
with a `per_image = True` attribute on its factory). Every reward's parameters are set under
`rollouts.rewards.<name>` and named `rollouts.rewards.<name>.<param>` in its errors.

The registered rewards: `ocr` (`ocr.py`), `clip_score`, `aesthetic`, `pickscore` (`clip.py`),
`geneval` (`geneval.py`), and
`timed` (`timed.py`, a scorer of set cost for benchmarks), and
the toy world's `toy_geneval`, `toy_strict`, `toy_quality`, `toy_color_area` (`pipeline/toy/plugins.py`).
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
    per_image: bool = False  # an image's score does not depend on the rest of the call: calls may be split

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "params": self.params}


_FACTORIES: dict[str, tuple[Callable[..., RewardFn], str]] = {}
_DESCRIBE: dict[str, Callable[..., dict]] = {}


def register_reward(name: str, *, version: str = "1", describe: Callable[..., dict] | None = None,
                    per_image: bool = False):
    def deco(factory):
        _FACTORIES[name] = (factory, version)
        if describe is not None:
            _DESCRIBE[name] = describe
        factory.per_image = per_image
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
    return Reward(name, version, _described(name, params), fn, per_image=bool(getattr(factory, "per_image", False)))


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


# The built-in rewards, registered when their modules are imported (nothing heavy at their top): ours here, and
# the toy world's (`toy_*`), a plug-in named by its module so that this registry does not import the toy world.
from . import clip, geneval, ocr, timed  # noqa: F401

PLUGINS = ("pipeline.toy.plugins",)
for _plugin in PLUGINS:
    importlib.import_module(_plugin)
