"""Benchmark of stage one's pipeline: does sampling overlap the rewards? (`make bench`'s overlap rows)

With the `timed` reward (pipeline/rewards/timed.py: a set cost per image that releases the GIL, as onnxruntime
does), measured in one run on the same prompts, model and shards:
- S, sampling only: `gdro rollouts` with the reward at no cost (sampling, decoding, reference cache, writing),
  the mean of one run before the others and one after;
- R, rewards only: the same scorer at cost c scoring the same images, shard by shard, with nothing else
  running; c is set from S so that R = S, the case where overlap matters most;
- W, the pipelined `gdro rollouts` (the config's `rollouts.pipeline_depth`, `reward_workers`) with the reward at cost c, and
  W_seq the same with `pipeline_depth=0, reward_workers=0` (one shard after the other, as before the pipeline).
Times are the shards' (sum of their stats files' `seconds`, the shard loop's wall time), without the one-off
start-up, with one torch thread. Goal: W <= 1.15 x max(S, R); strictly sequential work takes S + R = 2 max(S, R). The pipeline overlaps
whole shards, so the last shard's rewards and writing are not hidden: more shards per task bring W closer to
max(S, R).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ExperimentConfig

OVERLAP_GOAL = 1.15  # pipelined wall <= 1.15 x max(sampling only, rewards only) when they are equal


def _shards_seconds(root: Path) -> float:
    from schemas.records import ShardStats

    return sum(ShardStats.load(p).seconds for p in (root / "shards").glob("[0-9]*.stats.json"))


def bench_overlap(cfg: ExperimentConfig, *, n_prompts: int = 64, prompts_per_shard: int = 4) -> list[dict]:
    from stages.rollouts import main as rollouts

    r0 = cfg.rollouts
    images = n_prompts * r0.group_size

    def run(out: Path, cost: float, **pipeline) -> float:
        r = dataclasses.replace(r0, out=str(out), num_prompts=n_prompts, prompts_per_shard=prompts_per_shard,
                                rewards={"timed": {"seconds_per_image": cost}}, **pipeline)
        rollouts(dataclasses.replace(cfg, rollouts=r))
        return _shards_seconds(out)

    piped = {"pipeline_depth": r0.pipeline_depth, "reward_workers": r0.reward_workers}  # the config's
    threads = torch.get_num_threads()
    # one torch thread, as on a GPU node where sampling leaves the cores to the rewards and the writer; and
    # OpenMP's busy-waiting on a CPU shared with other jobs makes multi-threaded runs vary several-fold
    torch.set_num_threads(1)
    try:
        return _measure(cfg, run, piped, n_prompts, prompts_per_shard, images)
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: ExperimentConfig, run, piped: dict, n_prompts: int, prompts_per_shard: int, images: int) -> list:
    from pipeline.reward_scoring import RewardScorer
    from pipeline.rewards import make_reward

    r0 = cfg.rollouts
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sampling = run(tmp / "sampling", 0.0, **piped)
        cost = sampling * max(1, piped["reward_workers"]) / images  # so that the rewards alone take as long
        shape = _image_shape(tmp / "sampling")
        with RewardScorer([make_reward("timed", {"seconds_per_image": cost})], piped["reward_workers"]) as scorer:
            t0 = time.perf_counter()
            for start in range(0, n_prompts, prompts_per_shard):
                n = min(prompts_per_shard, n_prompts - start) * r0.group_size
                scorer.submit(np.zeros((n, *shape), np.uint8), [""] * n, [{}] * n).result()
            rewards = time.perf_counter() - t0
        wall = run(tmp / "pipelined", cost, **piped)
        sequential = run(tmp / "sequential", cost, pipeline_depth=0, reward_workers=0)
        again = run(tmp / "sampling-again", 0.0, **piped)  # before and after: load from other jobs hits both sides
    sampling = (sampling + again) / 2
    longest = max(sampling, rewards)
    label = (f"{n_prompts} prompts x G={r0.group_size} in {-(-n_prompts // prompts_per_shard)} shards; sampling "
             f"{sampling:.1f} s (mean of one run before and one after), rewards {rewards:.1f} s")
    return [
        {"name": f"rollouts overlap, s ({label})", "ours": wall, "plain": longest, "goal": OVERLAP_GOAL,
         "ours_label": f"`gdro rollouts` pipelined (depth {piped['pipeline_depth']}, "
                       f"{piped['reward_workers']} reward worker(s))",
         "plain_label": "max(sampling only, rewards only)"},
        {"name": "the same, one shard after the other, s", "ours": sequential, "plain": longest,
         "ours_label": "`gdro rollouts` with rollouts.pipeline_depth=0, reward_workers=0",
         "plain_label": "max(sampling only, rewards only)"},
        {"name": "rollouts overlap against the sum, s", "ours": wall, "plain": sampling + rewards,
         "ours_label": "`gdro rollouts` pipelined", "plain_label": "sampling only + rewards only"},
    ]


def _image_shape(root: Path) -> tuple[int, int, int]:
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(root / "shards" / "000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".webp")))
        return np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")).shape
