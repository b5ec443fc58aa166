"""Recipe: benchmarks, each a ratio of ours vs. the plain alternative measured in the same run on the same
machine (absolute times on a shared CPU mean little). Writes bench/out/results.md and results.json.

- rollouts end to end: `gdro rollouts` vs. a plain prompt-by-prompt loop, and its wall-time shares;
- rollouts sampling: batches spanning prompts (`rollouts.batch_size` images) vs. one prompt's G images per batch;
- training step: reference errors from the stage-one cache vs. a live frozen copy of the model;
- shard reading: gdro's group pipeline (no image decoding) vs. decoding every member with webdataset.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from pipeline.backends.base import Conditioning, load_backend, load_transformer, transformer_velocity
from pipeline.config import ExperimentConfig
from pipeline.flow import flow_errors
from pipeline.sampling import SamplerConfig, sample
from stages.bench_real import bench_sd3_rollouts


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_sampling(cfg: ExperimentConfig, n_prompts: int, repeats: int) -> dict:
    backend = load_backend(cfg.model.backend, cfg.model.path)
    g = cfg.rollouts.group_size
    sampler = SamplerConfig(steps=cfg.sampler.steps)
    cond = backend.encode_prompts(["a photo of a red circle and a blue square"] * n_prompts)
    noise = torch.randn(n_prompts * g, *backend.latent_shape)
    full = cond.repeat_interleave(g)

    def batched():
        for s in range(0, len(noise), cfg.rollouts.batch_size):
            sample(backend, noise[s:s + cfg.rollouts.batch_size], full[s:s + cfg.rollouts.batch_size], sampler)

    def per_prompt():
        for p in range(n_prompts):
            sample(backend, noise[p * g:(p + 1) * g], cond[p:p + 1].repeat_interleave(g), sampler)

    a, b = _timeit(batched, repeats), _timeit(per_prompt, repeats)
    return {"name": "rollouts sampling, images/s", "ours": len(noise) / a, "plain": len(noise) / b,
            "ours_label": f"batches of {cfg.rollouts.batch_size} across prompts", "plain_label": f"one prompt ({g} images) per batch"}


def bench_rollouts(cfg: ExperimentConfig, n_prompts: int) -> list[dict]:
    """`gdro rollouts` end to end (sampling, decoding, every reward, reference cache, encoding, writing) vs. a
    plain loop calling the same model prompt by prompt (G images per call, same sampler, nothing scored or
    written); and where the rollouts' wall time goes, from the shards' own stats."""
    import dataclasses
    import tempfile

    from pipeline.prompts import load_prompts
    from schemas.records import ShardStats
    from stages.rollouts import main as rollouts

    g = cfg.rollouts.group_size
    with tempfile.TemporaryDirectory() as tmp:
        r = dataclasses.replace(cfg.rollouts, out=tmp, num_prompts=n_prompts, prompts_per_shard=n_prompts // 2)
        run_cfg = dataclasses.replace(cfg, rollouts=r)
        t0 = time.perf_counter()
        rollouts(run_cfg)
        ours = time.perf_counter() - t0
        stats = [ShardStats.load(p) for p in sorted(Path(tmp, "shards").glob("[0-9]*.stats.json"))]
    backend = load_backend(cfg.model.backend, cfg.model.path)
    metas = load_prompts(cfg.rollouts.prompts)[:n_prompts]
    null = backend.encode_prompts([""]) if cfg.sampler.guidance != 1.0 else None
    t0 = time.perf_counter()
    for m in metas:
        cond = backend.encode_prompts([m["prompt"]]).repeat_interleave(g)
        backend.decode(sample(backend, torch.randn(g, *backend.latent_shape), cond, cfg.sampler, null_cond=null))
    plain = time.perf_counter() - t0
    images = n_prompts * g
    in_shards = sum(st.seconds for st in stats)  # without the one-off start-up (model load, fingerprint)
    rows = [{"name": "rollouts, images/s", "ours": images / ours, "plain": images / plain,
             "ours_label": "`gdro rollouts` whole command incl. start-up, rewards, cache, writing",
             "plain_label": "prompt-by-prompt loop, images only"},
            {"name": "rollouts per shard, images/s", "ours": images / in_shards, "plain": images / plain,
             "ours_label": "`gdro rollouts` shards (sum of stats seconds)", "plain_label": "prompt-by-prompt loop, images only"}]
    for phase in ("sampling", "rewards", "reference_cache", "writing"):
        share = sum(st.timings.get(phase, 0.0) for st in stats) / ours
        rows.append({"name": f"rollouts wall-time share: {phase}", "share": share})
    rows.append({"name": "rollouts wall-time share: start-up and the rest", "share": 1 - in_shards / ours})
    return rows


def bench_reference(cfg: ExperimentConfig, groups: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = load_transformer(cfg.model.backend, cfg.model.path).train()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    g = cfg.rollouts.group_size
    shape = (3, 32, 32)
    x0, eps = torch.randn(groups * g, *shape), torch.randn(groups * g, *shape)
    t = torch.rand(groups).repeat_interleave(g)
    dim = model.config.joint_attention_dim
    cond = Conditioning(torch.randn(groups * g, 12, dim), torch.randn(groups * g, model.config.pooled_projection_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(live: bool):
        err = flow_errors(lambda x, tt, c: transformer_velocity(model, x, tt, c), x0, eps, t, cond)
        if live:
            with torch.no_grad():
                ref = flow_errors(lambda x, tt, c: transformer_velocity(frozen, x, tt, c), x0, eps, t, cond)
        else:
            ref = torch.zeros_like(err)  # read from the batch: free
        loss = (err - ref).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    a, b = _timeit(lambda: step(False), repeats), _timeit(lambda: step(True), repeats)
    return {"name": "training step, groups/s", "ours": groups / a, "plain": groups / b,
            "ours_label": "reference errors from the stage-one cache", "plain_label": "live frozen reference copy"}


def bench_reading(dataset: Path, repeats: int) -> dict | None:
    import webdataset as wds

    from pipeline.data import group_batches, shard_urls

    if not (dataset / "manifest.json").exists():
        return None
    manifest, urls = shard_urls(dataset)
    n = manifest["totals"]["groups"]
    weights = {manifest["rewards"][0]["name"]: 1.0}

    def ours():
        _, loader = group_batches(dataset, groups=1, weights=weights, seed=0, rank=0, world=1, workers=0,
                                  shuffle_buffer=1)
        it = iter(loader)
        for _ in range(n):
            next(it)

    def plain():
        for _ in wds.WebDataset(urls, shardshuffle=False).decode("rgb"):
            pass

    a, b = _timeit(ours, repeats), _timeit(plain, repeats)
    return {"name": "shard reading, groups/s", "ours": n / a, "plain": n / b,
            "ours_label": "gdro group pipeline (arrays only, whitelist decoder)", "plain_label": "webdataset .decode('rgb') of every member"}


def main(cfg: ExperimentConfig, *, out: Path = Path("bench/out"), repeats: int = 3) -> Path:
    rows = [*bench_rollouts(cfg, n_prompts=64), bench_sampling(cfg, n_prompts=16, repeats=repeats),
            bench_reference(cfg, groups=8, repeats=repeats)]
    reading = bench_reading(Path(cfg.rollouts.out), repeats)
    if reading:
        rows.append(reading)
    rows += bench_sd3_rollouts()  # stages/bench_real.py: tiny SD3, `gdro rollouts` vs. diffusers' own pipeline
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| benchmark | ours | plain alternative | ratio |", "|---|---|---|---|"]
    for r in rows:
        if "share" in r:
            lines.append(f"| {r['name']} | {100 * r['share']:.1f} % | | |")
            continue
        r["ratio"] = r["ours"] / r["plain"]
        lines.append(f"| {r['name']} | {r['ours']:.1f} ({r['ours_label']}) | {r['plain']:.1f} ({r['plain_label']}) "
                     f"| {r['ratio']:.2f}x |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"Measured in one run on this machine ({torch.get_num_threads()} threads); "
                                    f"compare ratios, not absolute numbers.\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return out
