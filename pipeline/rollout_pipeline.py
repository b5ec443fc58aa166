"""Stage one's pipeline: shards are finished (scores collected, images encoded, files written) on one writer
thread while the caller samples the next, so the accelerator does not wait for rewards and encoding.

Bounded: at most `depth` shards are handed on and unfinished at any time, so with the one being sampled a task
holds at most depth + 1 shards in memory however long it runs. Shards are finished in the order they are
handed on, each by the same code as the sequential path (`depth` = 0, everything in the caller), so the bytes
do not depend on the depth; and each shard's files still appear atomically, its stats last, so a kill at any
moment loses at most the depth + 1 shards in flight and a restart redoes exactly those.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self


class ShardPipeline:
    """`submit(fn, *args)` runs fn on the writer thread (in the caller when depth = 0) and returns once at most
    `depth` jobs are unfinished. A job's exception is raised in the caller at the next `submit` or at `drain`,
    and the jobs queued after it are skipped (nothing is written after a failure); if the caller fails, the
    jobs already handed on are still run on leaving the `with` block. `last_finished`: when the
    previous job ended (time.time()), for each shard's share of the task's wall time."""

    def __init__(self, depth: int):
        self.depth = depth
        self.last_finished: float | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="gdro-writer") if depth else None
        self._pending: deque[Future] = deque()
        self._failed = threading.Event()

    def _run(self, fn: Callable, args: tuple):
        if self._failed.is_set():
            return None
        try:
            return fn(*args)
        except BaseException:
            self._failed.set()
            raise
        finally:
            self.last_finished = time.time()

    def submit(self, fn: Callable, *args) -> None:
        if self._writer is None:
            self._run(fn, args)
            return
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # raises a finished job's error before more work is queued
        self._pending.append(self._writer.submit(self._run, fn, args))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._writer is None:
            return
        # the caller failed (sampling, say): the shards handed on are complete, so they are still written (a
        # restart would redo them); their own errors, if any, give way to the caller's
        self._writer.shutdown(wait=True)
