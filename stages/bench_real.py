"""Benchmark for the real backends (issue 6): stage one on a tiny random-weight SD3 pipeline, `gdro rollouts`
against diffusers' own `StableDiffusion3Pipeline` called in a loop with the same steps, guidance, resolution
and batch, measured in the same run (the ratio is what carries over between machines).

Both sides sample the same images: 16 OCR-style prompts x G = 4 at 64 px, 4 Euler steps, CFG 4.5, batches of
16 images. `gdro rollouts` additionally scores every image (a trivial reward, so the row measures our overhead,
not a reward model's), encodes PNGs, and writes tars, Parquet and stats; no reference cache (K = 0), which the
plain loop has no counterpart for. Two rows, as for the toy model: the whole command (model load, weight
hashing) against the loop including its `from_pretrained`, and the shards alone (their stats files' seconds)
against the loop alone.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

PROMPTS = 16
GROUP = 4
STEPS = 4
RESOLUTION = 64
BATCH = 16
GUIDANCE = 4.5
MAX_LEN = 16  # T5 tokens
WORDS = ["hello", "open late", "exit", "welcome home", "cafe", "no parking", "sale", "bakery"]


def mean_brightness():
    """A trivial reward (`stages.bench_real:mean_brightness`): the benchmark measures gdro, not a scorer."""
    def fn(images, prompts, metadata):
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0, {}

    return fn


def bench_sd3_rollouts() -> list[dict]:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from pipeline.backends.tiny import build_tiny_sd3
    from pipeline.config import ExperimentConfig, resolve
    from schemas.records import ShardStats
    from stages.rollouts import main as rollouts

    images = PROMPTS * GROUP
    prompts = [f'a sign that says "{WORDS[i % len(WORDS)]}", photo {i}' for i in range(PROMPTS)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_sd3(tmp / "model", resolution=RESOLUTION)
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
        cfg = resolve(ExperimentConfig, preset="sd35_ocr", overrides=[
            f"model.path={model}", "model.dtype=float32", f"model.resolution={RESOLUTION}",
            f"model.max_sequence_length={MAX_LEN}", f"sampler.steps={STEPS}", f"sampler.guidance={GUIDANCE}",
            f"rollouts.prompts={tmp / 'prompts.txt'}", f"rollouts.out={tmp / 'dataset'}", "rollouts.num_prompts=0",
            f"rollouts.group_size={GROUP}", f"rollouts.prompts_per_shard={PROMPTS // 2}", f"rollouts.batch_size={BATCH}",
            "rollouts.ref_cache_k=0", 'rollouts.rewards={"stages.bench_real:mean_brightness": {}}'])
        t0 = time.perf_counter()
        rollouts(cfg)
        ours = time.perf_counter() - t0
        in_shards = sum(ShardStats.load(p).seconds for p in (tmp / "dataset" / "shards").glob("*.stats.json"))

        t0 = time.perf_counter()
        pipe = StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        t_loaded = time.perf_counter()
        flat = [p for p in prompts for _ in range(GROUP)]  # the same images, in batches of BATCH
        gen = torch.Generator().manual_seed(0)
        for s in range(0, images, BATCH):
            pipe(flat[s:s + BATCH], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RESOLUTION,
                 width=RESOLUTION, max_sequence_length=MAX_LEN, generator=gen, output_type="np")
        plain_end = time.perf_counter()
    label = f"{PROMPTS} prompts x G={GROUP}, {RESOLUTION} px, {STEPS} steps, CFG {GUIDANCE:g}, batch {BATCH}"
    return [
        {"name": f"tiny SD3 rollouts, images/s ({label})", "ours": images / ours, "plain": images / (plain_end - t0),
         "ours_label": "`gdro rollouts` whole command incl. start-up, reward, writing",
         "plain_label": "StableDiffusion3Pipeline loop incl. from_pretrained"},
        {"name": "tiny SD3 rollouts per shard, images/s", "ours": images / in_shards,
         "plain": images / (plain_end - t_loaded), "ours_label": "`gdro rollouts` shards (sum of stats seconds)",
         "plain_label": "StableDiffusion3Pipeline loop, images only"},
    ]
