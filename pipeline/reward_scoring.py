"""Scoring a shard's images with every reward: failures cost rows, never the shard; optionally on threads.

A call that raises is retried image by image, so one bad image costs one row's status; a non-finite score fails
its row too. With `workers` > 0 the scoring runs beside the caller (stage one samples the next shard meanwhile):
a reward registered `per_image` has its call split into one chunk per worker (its scores do not depend on the
rest of the call, so they are those of one call), any other (a GPU model batching internally, a user scorer)
gets one call per shard, as in the sequential path, on a thread of its own that takes the shards in order.
Either way every score and error string equals the sequential path's.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self

import numpy as np

from .errors import GdroError
from .rewards import Reward


def _call(rw: Reward, images: np.ndarray, prompts: list[str], metas: list[dict]) -> tuple[list, list]:
    """(scores, error string or None per image) of one call, retried image by image if it raises."""
    n = len(images)
    try:
        values, _info = rw.fn(images, prompts, metas)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape[0] != n:
            raise GdroError(f"reward {rw.name} returned {values.shape[0]} scores for {n} images")
        return list(values), [None] * n
    except GdroError:
        raise
    except Exception:  # noqa: BLE001  a user scorer may raise anything: isolate the failing image(s)
        scores, errors = [], []
        for i in range(n):
            try:
                scores.append(float(np.asarray(rw.fn(images[i:i + 1], prompts[i:i + 1], metas[i:i + 1])[0])
                                    .reshape(-1)[0]))
                errors.append(None)
            except Exception as e:  # noqa: BLE001  recorded in the row, not raised
                scores.append(None)
                errors.append(f"{rw.name}: {type(e).__name__}: {e}")
        return scores, errors


def _merge(rewards: list[Reward], results: list[tuple[list, list]]) -> tuple[dict, list[list[str]]]:
    """({name: [score or None]}, [[error strings] per image]), in reward order, non-finite scores as errors."""
    n = len(results[0][0]) if results else 0
    scores, errors = {}, [[] for _ in range(n)]
    for rw, (values, errs) in zip(rewards, results):
        column = []
        for i, (v, e) in enumerate(zip(values, errs)):
            if e is not None:
                errors[i].append(e)
            if v is not None and not np.isfinite(v):
                errors[i].append(f"{rw.name}: non-finite score {v}")
                v = None
            column.append(None if v is None else float(v))
        scores[rw.name] = column
    return scores, errors


def score(rewards: list[Reward], images: np.ndarray, prompts: list[str], metas: list[dict]) -> tuple[dict, list]:
    """Every reward on every image, in the caller: ({name: [score or None]}, [[error strings] per image])."""
    return _merge(rewards, [_call(rw, images, prompts, metas) for rw in rewards])


class Scoring:
    """One shard's scoring in progress: `result()` -> (scores, errors, seconds from the first call's start to
    the last one's end), waiting for the worker threads if there are any."""

    def __init__(self, rewards: list[Reward], parts: list[list[Future]]):
        self._rewards, self._parts = rewards, parts

    def result(self) -> tuple[dict, list[list[str]], float]:
        done = [[f.result() for f in chunks] for chunks in self._parts]  # [(scores, errors, start, end)]
        results = [([v for c in chunks for v in c[0]], [e for c in chunks for e in c[1]]) for chunks in done]
        spans = [c[2:] for chunks in done for c in chunks]
        seconds = max(s[1] for s in spans) - min(s[0] for s in spans) if spans else 0.0
        return (*_merge(self._rewards, results), seconds)


def _timed_call(rw, images, prompts, metas) -> tuple:
    start = time.time()
    return (*_call(rw, images, prompts, metas), start, time.time())


def _now(fn, *args) -> Future:
    f = Future()
    f.set_result(fn(*args))
    return f


class RewardScorer:
    """Scores shards with every reward: in the caller (`workers` = 0) or on `workers` threads for per-image
    rewards plus one thread for the others. Close it (or use it as a context manager) to stop the threads."""

    def __init__(self, rewards: list[Reward], workers: int = 0):
        self.rewards, self.workers = rewards, workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="gdro-reward") if workers else None
        self._whole = ThreadPoolExecutor(1, thread_name_prefix="gdro-reward-whole") if workers else None

    def submit(self, images: np.ndarray, prompts: list[str], metas: list[dict]) -> Scoring:
        n = len(images)
        parts = []
        for rw in self.rewards:
            if self._pool is None:
                parts.append([_now(_timed_call, rw, images, prompts, metas)])
            elif rw.per_image:
                size = -(-n // self.workers)
                parts.append([self._pool.submit(_timed_call, rw, images[s:s + size], prompts[s:s + size],
                                                metas[s:s + size]) for s in range(0, n, size)])
            else:
                parts.append([self._whole.submit(_timed_call, rw, images, prompts, metas)])
        return Scoring(self.rewards, parts)

    def close(self, cancel: bool = False) -> None:
        for ex in (self._pool, self._whole):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(cancel=exc_type is not None)
