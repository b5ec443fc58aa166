"""The rollouts pipeline (pipeline/rollout_pipeline.py, pipeline/reward_scoring.py): the shards are the
sequential path's bytes at any depth and number of reward workers, a reward that raises still fails only its
rows, a whole-batch reward is never split, at most `depth` shards wait for the writer, and an error in the
writer reaches the caller with nothing written after it."""
from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import make_cfg, run, shard_files

# Two user scorers: one declared per-image that raises on a call holding a dark image (so that call is retried
# image by image), one whose scores depend on the whole call (each image against the call's mean), which the
# pipeline must never split.
SCORERS = '''
import numpy as np


def dark_raises():
    def fn(images, prompts, metadata):
        m = np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3))
        if (m < THRESHOLD).any():
            raise RuntimeError("too dark")
        return m / 255.0, {}

    return fn


dark_raises.per_image = True


def against_call_mean():
    def fn(images, prompts, metadata):
        m = np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3))
        return m - m.mean(), {}

    return fn
'''
REWARDS = ("rollouts.rewards={'pipe_scorers:dark_raises': {}, 'pipe_scorers:against_call_mean': {}, "
           "toy_quality: {}, toy_geneval: {}}")


@pytest.fixture
def scorers(tmp_path, monkeypatch, small_dataset):
    """The scorers above, with THRESHOLD at the median image brightness of the small dataset's first shard."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(small_dataset / "shards" / "000000.tar") as tar:
        means = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))).mean()
                 for m in tar.getmembers() if m.name.endswith(".png")]
    (tmp_path / "pipe_scorers.py").write_text(textwrap.dedent(SCORERS).replace("THRESHOLD", repr(float(np.median(means)))))
    monkeypatch.syspath_prepend(str(tmp_path))


def _data(root):
    return {n: b for n, b in shard_files(root).items() if not n.endswith(".stats.json")}  # stats carry timings


def test_pipelined_shards_are_the_sequential_bytes(tiny_toy_model, tmp_path, scorers):
    sequential = run(make_cfg(tiny_toy_model, tmp_path / "seq", REWARDS, "rollouts.pipeline_depth=0",
                              "rollouts.reward_workers=0"))
    piped = run(make_cfg(tiny_toy_model, tmp_path / "pipe", REWARDS, "rollouts.pipeline_depth=2",
                         "rollouts.reward_workers=3"))
    want = _data(sequential)
    assert len([n for n in want if n.endswith(".tar")]) == 3
    assert _data(piped) == want
    # what the comparison is about: rows that failed (only for the raising reward) and call-dependent scores
    table = pq.read_table(sequential / "shards" / "000000.parquet").to_pandas()
    bad = table[table["status"] == "error"]
    assert 0 < len(bad) < len(table) and bad["error"].str.startswith("pipe_scorers:dark_raises: RuntimeError").all()
    assert bad["reward_toy_quality"].notna().all() and table["reward_pipe_scorers:against_call_mean"].notna().all()


def test_scorer_splits_only_per_image_rewards():
    from pipeline.reward_scoring import RewardScorer
    from pipeline.rewards import Reward

    calls = {"per": [], "whole": []}

    def make(name):
        def fn(images, prompts, metadata):
            calls[name].append(len(images))
            m = np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3))
            return (m if name == "per" else m - m.mean()), {}
        return fn

    rewards = [Reward("per", "1", {}, make("per"), per_image=True), Reward("whole", "1", {}, make("whole"))]
    images = np.random.default_rng(0).integers(0, 255, (10, 4, 4, 3), dtype=np.uint8)
    texts, metas = ["p"] * 10, [{}] * 10
    with RewardScorer(rewards, 0) as inline:
        want = inline.submit(images, texts, metas).result()[:2]
    assert calls == {"per": [10], "whole": [10]}
    for seen in calls.values():
        seen.clear()
    with RewardScorer(rewards, 3) as threads:
        got = threads.submit(images, texts, metas).result()[:2]
    assert got == want
    assert sorted(calls["per"]) == [2, 4, 4] and calls["whole"] == [10]
    from pipeline.reward_scoring import score

    assert score(rewards, images, texts, metas) == want  # the one-call form (no threads) is the same


def test_pipeline_holds_at_most_depth_shards_and_keeps_their_order():
    from pipeline.rollout_pipeline import ShardPipeline

    release = threading.Semaphore(0)
    lock = threading.Lock()
    pending, most, order = [0], [0], []

    def job(k):
        release.acquire()
        order.append(k)
        with lock:
            pending[0] -= 1

    def feeder():
        with ShardPipeline(2) as pipe:
            for k in range(8):
                with lock:
                    pending[0] += 1
                    most[0] = max(most[0], pending[0])
                pipe.submit(job, k)
            pipe.drain()

    th = threading.Thread(target=feeder)
    th.start()
    for _ in range(8):
        time.sleep(0.02)  # let the feeder run ahead as far as the pipeline lets it
        with lock:
            assert pending[0] <= 3  # 2 handed on + the one the feeder is about to hand on
        release.release()
    th.join(10)
    assert not th.is_alive() and order == list(range(8)) and most[0] == 3


def test_a_writer_error_reaches_the_caller_and_nothing_is_written_after_it():
    from pipeline.rollout_pipeline import ShardPipeline

    done = []

    def job(k):
        if k == 1:
            raise OSError("disk full")
        time.sleep(0.01)
        done.append(k)

    with pytest.raises(OSError, match="disk full"), ShardPipeline(3) as pipe:
        for k in range(6):
            pipe.submit(job, k)
        pipe.drain()
    assert done == [0]


def test_a_sampling_error_still_writes_the_shards_handed_on(tiny_toy_model, small_dataset, tmp_path, monkeypatch):
    """The sampling thread fails on the third shard: the two handed on to the writer are written whole (the same
    bytes as an uninterrupted run), nothing of the third."""
    from stages import rollouts

    real, seen = rollouts.generate_shard, []

    def failing(index, *args, **kwargs):
        seen.append(index)
        if index == 2:
            raise RuntimeError("CUDA out of memory")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(rollouts, "generate_shard", failing)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="out of memory"):
        run(make_cfg(tiny_toy_model, out, "rollouts.pipeline_depth=2"))
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == [f"00000{i}.{ext}" for i in (0, 1) for ext in ("parquet", "stats.json", "tar")]
    want = _data(small_dataset)
    assert _data(out) == {n: b for n, b in want.items() if not n.startswith("000002")}
