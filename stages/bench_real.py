"""Benchmark for the real backends: stage one on a tiny random-weight SD3 pipeline, `gdro rollouts`
against diffusers' own `StableDiffusion3Pipeline` called in a loop with the same steps, guidance, resolution
and batch, measured in the same run (the ratio is what carries over between machines).

Both sides sample the same images: 16 OCR-style prompts x G = 4 at 64 px, 4 Euler steps, CFG 4.5, batches of
16 images. `gdro rollouts` additionally scores every image (a trivial reward, so the row measures our overhead,
not a reward model's), encodes PNGs, and writes tars, Parquet and stats; no reference cache (K = 0), which the
plain loop has no counterpart for. Two rows, as for the toy model: the whole command (model load, weight
hashing) against the loop including its `from_pretrained`, and the shards alone (their stats files' seconds)
against the loop alone. The rounds alternate between the two sides; each side's best round counts, in wall
time and (first row) also in CPU seconds of this process, which load from other jobs disturbs far less. One
torch thread on both sides: with more, OpenMP's busy-waiting on a CPU shared with other jobs makes both wall and
CPU times vary several-fold between identical runs.
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


def bench_sd3_rollouts(rounds: int = 3) -> list[dict]:
    """`rounds` alternating runs of each side (so load from other jobs hits both alike); the best of each, in wall
    time and in CPU seconds of this process (which that load disturbs far less)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from pipeline.backends.tiny import build_tiny_sd3
    from pipeline.config import ExperimentConfig, resolve
    from schemas.records import ShardStats
    from stages.rollouts import main as rollouts

    images = PROMPTS * GROUP
    prompts = [f'a sign that says "{WORDS[i % len(WORDS)]}", photo {i}' for i in range(PROMPTS)]
    flat = [p for p in prompts for _ in range(GROUP)]  # the same images, in batches of BATCH
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_sd3(tmp / "model", resolution=RESOLUTION)
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")

        def ours(k: int) -> tuple[float, float, float]:
            cfg = resolve(ExperimentConfig, preset="sd35_ocr", overrides=[
                f"model.path={model}", "model.dtype=float32", f"model.resolution={RESOLUTION}",
                f"model.max_sequence_length={MAX_LEN}", f"sampler.steps={STEPS}", f"sampler.guidance={GUIDANCE}",
                f"rollouts.prompts={tmp / 'prompts.txt'}", f"rollouts.out={tmp / f'dataset{k}'}",
                "rollouts.num_prompts=0", f"rollouts.group_size={GROUP}", f"rollouts.prompts_per_shard={PROMPTS // 2}",
                f"rollouts.batch_size={BATCH}", "rollouts.ref_cache_k=0",
                'rollouts.rewards={"stages.bench_real:mean_brightness": {}}'])
            w, c = time.perf_counter(), time.process_time()
            rollouts(cfg)
            w, c = time.perf_counter() - w, time.process_time() - c
            shards = sum(ShardStats.load(p).seconds for p in (tmp / f"dataset{k}" / "shards").glob("*.stats.json"))
            return w, c, shards

        def plain() -> tuple[float, float, float]:
            w, c = time.perf_counter(), time.process_time()
            pipe = StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            loaded = time.perf_counter()
            gen = torch.Generator().manual_seed(0)
            for s in range(0, images, BATCH):
                pipe(flat[s:s + BATCH], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RESOLUTION,
                     width=RESOLUTION, max_sequence_length=MAX_LEN, generator=gen, output_type="np")
            end = time.perf_counter()
            return end - w, time.process_time() - c, end - loaded

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # busy-waiting OpenMP threads on a shared CPU make both times erratic
        try:
            runs = [(ours(k), plain()) for k in range(rounds)]
        finally:
            torch.set_num_threads(threads)
    (ow, oc, osh), (pw, pc, pl) = [[min(r[side][i] for r in runs) for i in range(3)] for side in (0, 1)]
    label = f"{PROMPTS} prompts x G={GROUP}, {RESOLUTION} px, {STEPS} steps, CFG {GUIDANCE:g}, batch {BATCH}"
    return [
        {"name": f"tiny SD3 rollouts, images/s ({label}; best of {rounds})", "ours": images / ow, "plain": images / pw,
         "cpu_ours": images / oc, "cpu_plain": images / pc,
         "ours_label": "`gdro rollouts` whole command incl. start-up, reward, writing",
         "plain_label": "StableDiffusion3Pipeline loop incl. from_pretrained"},
        {"name": "tiny SD3 rollouts per shard, images/s", "ours": images / osh, "plain": images / pl,
         "ours_label": "`gdro rollouts` shards (sum of stats seconds)",
         "plain_label": "StableDiffusion3Pipeline loop, images only"},
    ]
