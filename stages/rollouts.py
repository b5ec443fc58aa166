"""Recipe, stage one: prompts -> G images each from the frozen reference -> every reward -> schema-v1 shards.

setup (config, fingerprint check, task's shards, leftovers removed) -> for each pending shard: sample, decode,
score, cache reference errors, write tar + parquet under temporary names, rename, write stats last ->
assemble the manifest when every shard is done. Pipelined (`pipeline/rollout_pipeline.py`): the rewards score
shard k on worker threads (`rollouts.reward_workers`) while this thread caches its reference errors and samples
shard k+1, and a writer thread encodes and writes shard k (`rollouts.pipeline_depth` shards in flight; 0: all
in this thread, one shard after the other). Restarting skips finished shards, so preemption costs at most the
depth + 1 shards in flight per task, and the bytes never depend on how many tasks ran or where, nor on the
pipeline's depth or workers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backends.base import Conditioning, backend_from_config
from pipeline.config import ExperimentConfig
from pipeline.dataset_identity import prepare_folder, shard_is_complete
from pipeline.distributed import task_from_env
from pipeline.errors import GdroError
from pipeline.flow import flow_errors, sample_t
from pipeline.prompt_files import load_prompts
from pipeline.reward_scoring import RewardScorer, Scoring
from pipeline.rewards import make_reward
from pipeline.rollout_pipeline import ShardPipeline
from pipeline.sampling import sample, uses_cfg
from pipeline.shard_writer import write_shard
from schemas import layout
from schemas.codec import from_storage, image_bytes, json_bytes, npy_bytes, to_storage
from schemas.manifest import assemble_manifest
from schemas.records import GroupRecord, ShardStats, sha256_bytes
from schemas.seeds import member_seed, noise_for


@dataclass
class Plan:
    cfg: ExperimentConfig
    root: Path
    prompts: list[dict]
    num_shards: int
    fingerprint: str


@dataclass
class Sampled:
    """A shard after the sampling thread's part, handed to the writer: what its records and members are made of."""
    index: int
    ids: list[int]
    metas: list[dict]
    texts: list[str]
    seeds: list[list[int]]
    latents: torch.Tensor
    images: np.ndarray
    cond: Conditioning
    ref: tuple | None  # (t [groups, K], noise seeds, errors [groups, K, G]) when rollouts.ref_cache_k > 0


def plan(cfg: ExperimentConfig) -> Plan:
    r = cfg.rollouts
    prompts = load_prompts(r.prompts)
    if r.num_prompts:
        if r.num_prompts > len(prompts):
            raise GdroError(f"rollouts.num_prompts={r.num_prompts} but {r.prompts} holds {len(prompts)} prompts")
        prompts = prompts[: r.num_prompts]
    root = Path(r.out)
    fingerprint = prepare_folder(root, cfg, prompts)
    return Plan(cfg, root, prompts, layout.num_shards(len(prompts), r.prompts_per_shard), fingerprint)


def _as_stored(x: torch.Tensor, dtype: str, key: str) -> torch.Tensor:
    """float32 values as stored in `dtype` and read back (bfloat16/float16 rounding; float32 unchanged). Called
    before anything is written, so a value the dtype cannot hold stops the shard with the key to change."""
    try:
        return torch.from_numpy(from_storage(to_storage(x.float().cpu().numpy(), dtype), dtype, "rollouts"))
    except ValueError as e:
        raise GdroError(f"{key}={dtype}: {e}") from None


def _reference_errors(backend, latents: torch.Tensor, cond: Conditioning, metas_ids: list[int], cfg) -> tuple:
    """K draws per group (t_k, noise seed s_k) shared by the group; the frozen model's error per member."""
    r = cfg.rollouts
    g = r.group_size
    n_groups = len(metas_ids)
    ts = np.zeros((n_groups, r.ref_cache_k), np.float32)
    seeds = np.zeros((n_groups, r.ref_cache_k), np.int64)
    errs = np.zeros((n_groups, r.ref_cache_k, g), np.float64)
    for gi, pid in enumerate(metas_ids):
        for k in range(r.ref_cache_k):
            gen = torch.Generator().manual_seed(member_seed(r.base_seed, pid, 0, f"ref_t{k}"))
            ts[gi, k] = float(sample_t(1, gen, law=r.t_law, t_min=r.t_min, t_max=r.t_max)[0])
            seeds[gi, k] = member_seed(r.base_seed, pid, 0, f"ref_eps{k}")
    per_batch = max(1, r.batch_size // g)
    with torch.no_grad():
        for k in range(r.ref_cache_k):
            for start in range(0, n_groups, per_batch):
                grp = range(start, min(start + per_batch, n_groups))
                x0 = torch.cat([latents[gi * g:(gi + 1) * g] for gi in grp])
                eps = torch.cat([noise_for(int(seeds[gi, k]), backend.latent_shape).expand(g, -1, -1, -1)
                                 for gi in grp])
                t = torch.cat([torch.full((g,), float(ts[gi, k])) for gi in grp])
                c = Conditioning.cat([cond[gi:gi + 1].repeat_interleave(g) for gi in grp])
                dev, dt = backend.device, backend.dtype
                e = flow_errors(backend.velocity, x0.to(dev, dt), eps.to(dev, dt), t, c.to(dev, dt))
                errs[list(grp), k] = e.double().reshape(len(grp), g).cpu().numpy()
    return ts, seeds, errs


def generate_shard(index: int, p: Plan, backend, scorer: RewardScorer, pipe: ShardPipeline, task_id: int, bar: tqdm,
                   report=None) -> None:
    """This thread's part of a shard (the accelerator's work): sample, decode, cache the reference errors; the
    rewards score meanwhile on `scorer`; then `pipe` finishes it (`_finish_shard`) while the next one samples."""
    cfg, r = p.cfg, p.cfg.rollouts
    t0 = time.time()
    g = r.group_size
    ids = list(layout.shard_prompt_ids(index, len(p.prompts), r.prompts_per_shard))
    metas = [p.prompts[i] for i in ids]
    texts = [m["prompt"] for m in metas]
    cond = backend.encode_prompts(texts)
    sampler = cfg.sampler
    null = backend.encode_prompts([""]) if uses_cfg(backend, sampler) else None  # CFG: the empty prompt
    seeds = [[member_seed(r.base_seed, pid, m) for m in range(g)] for pid in ids]
    flat = [(gi, m) for gi in range(len(ids)) for m in range(g)]
    latents = torch.empty(len(flat), *backend.latent_shape)
    timings = {}
    mark = time.time()
    for start in range(0, len(flat), r.batch_size):  # batches span prompts, never shards
        chunk = flat[start:start + r.batch_size]
        noise = torch.stack([noise_for(seeds[gi][m], backend.latent_shape) for gi, m in chunk])
        c = Conditioning.cat([cond[gi:gi + 1] for gi, _ in chunk])
        latents[start:start + len(chunk)] = sample(backend, noise, c, sampler, null_cond=null).cpu()
        bar.update(len(chunk))
    images = backend.decode(latents)
    # the cache is of what stage two reads back, not of more
    latents = _as_stored(latents, r.latents_dtype, "rollouts.latents_dtype")
    cond = Conditioning(_as_stored(cond.prompt_embeds, r.embeds_dtype, "rollouts.embeds_dtype"),
                        _as_stored(cond.pooled_embeds, r.embeds_dtype, "rollouts.embeds_dtype"))
    timings["sampling"], mark = time.time() - mark, time.time()
    scoring = scorer.submit(images, [texts[gi] for gi, _ in flat], [metas[gi] for gi, _ in flat])
    ref = _reference_errors(backend, latents, cond, ids, cfg) if r.ref_cache_k else None
    timings["reference_cache"] = time.time() - mark
    shard = Sampled(index, ids, metas, texts, seeds, latents, images, cond, ref)
    pipe.submit(_finish_shard, p, shard, scoring, pipe, task_id, t0, timings, report)


def _finish_shard(p: Plan, shard: Sampled, scoring: Scoring, pipe: ShardPipeline, task_id: int, t0: float,
                  timings: dict, report) -> ShardStats:
    """The writer's part: the rewards' scores, the groups' records and members, the files (`_write_shard`)."""
    r = p.cfg.rollouts
    g = r.group_size
    index, ids, metas, texts, seeds = shard.index, shard.ids, shard.metas, shard.texts, shard.seeds
    latents, images, cond = shard.latents, shard.images, shard.cond
    scores, errors, timings["rewards"] = scoring.result()
    finite = torch.isfinite(latents).flatten(1).all(1)
    for i in np.nonzero(~finite.numpy())[0]:
        errors[i].append("sampler: non-finite latents")
    if r.ref_cache_k:
        ref_t, ref_seeds, ref_err = shard.ref
    mark = time.time()
    records, samples = [], []
    for gi, pid in enumerate(ids):
        key = layout.group_key(pid)
        sl = slice(gi * g, (gi + 1) * g)
        ext = layout.image_ext(r.image_format)
        pngs = [image_bytes(images[i], ext, r.image_quality) for i in range(sl.start, sl.stop)]
        errs = ["; ".join(errors[i]) for i in range(sl.start, sl.stop)]
        rec = GroupRecord(
            key=key, prompt_id=pid, prompt=texts[gi], metadata=metas[gi], seeds=seeds[gi],
            rewards={name: vals[sl] for name, vals in scores.items()},
            status=["error" if e else "ok" for e in errs], errors=errs,
            image_sha256=[sha256_bytes(b) for b in pngs],
            ref_t=[float(x) for x in ref_t[gi]] if r.ref_cache_k else [],
            ref_noise_seeds=[int(x) for x in ref_seeds[gi]] if r.ref_cache_k else [],
            ref_errors=[[float(x) for x in row] for row in ref_err[gi]] if r.ref_cache_k else [],
        )
        records.append(rec)
        sample_ = {"__key__": key, layout.JSON_MEMBER: json_bytes(rec.to_json()),
                   layout.LATENTS_MEMBER: npy_bytes(to_storage(latents[sl].numpy(), r.latents_dtype)),
                   layout.PROMPT_EMBEDS_MEMBER: npy_bytes(to_storage(cond.prompt_embeds[gi].float().cpu().numpy(),
                                                                     r.embeds_dtype)),
                   layout.POOLED_EMBEDS_MEMBER: npy_bytes(to_storage(cond.pooled_embeds[gi].float().cpu().numpy(),
                                                                     r.embeds_dtype))}
        for m, data in enumerate(pngs):
            sample_[layout.image_member(m, ext)] = data
        samples.append(sample_)
    # the shard's share of the task's wall time: from the previous shard's end (or its own start) to its end
    since = max(t0, pipe.last_finished or t0)
    stats = _write_shard(index, p, records, samples, task_id, since, timings, mark)
    if report is not None:
        report(stats)
    return stats


def _write_shard(index: int, p: Plan, records, samples, task_id: int, t0: float, timings: dict,
                 mark: float) -> ShardStats:
    return write_shard(p.root, index, records, samples, list(p.cfg.rollouts.rewards), fingerprint=p.fingerprint,
                       task_id=task_id, t0=t0, timings=timings, mark=mark)


def main(cfg: ExperimentConfig, *, task_id: int | None = None, num_tasks: int | None = None,
         assemble_only: bool = False) -> Path:
    p = plan(cfg)
    if assemble_only:
        return _assemble(p, require=True)
    task_id, num_tasks = task_from_env(task_id, num_tasks)
    if num_tasks > p.num_shards:
        raise GdroError(f"{num_tasks} tasks for {p.num_shards} shards: tasks {p.num_shards}..{num_tasks - 1} would "
                        f"have nothing to do; use at most {p.num_shards} tasks or a smaller "
                        f"rollouts.prompts_per_shard")
    mine = layout.shards_of_task(task_id, num_tasks, p.num_shards)
    pending = [s for s in mine if not shard_is_complete(p.root, s, p.fingerprint)]
    print(f"rollouts: task {task_id}/{num_tasks}: {len(mine)} shards, {len(mine) - len(pending)} already done, "
          f"{len(pending)} to generate into {p.root}", flush=True)
    if pending:
        torch.manual_seed(0)
        backend = backend_from_config(cfg)
        rewards = [make_reward(name, params) for name, params in cfg.rollouts.rewards.items()]
        per_shard = [len(layout.shard_prompt_ids(s, len(p.prompts), cfg.rollouts.prompts_per_shard)) for s in pending]
        bar = tqdm(total=sum(per_shard) * cfg.rollouts.group_size, desc=f"rollouts task {task_id}", unit="img",
                   dynamic_ncols=True)
        t0 = time.time()
        written = [0]

        def report(stats: ShardStats) -> None:  # on the writer thread, after each shard's stats file
            written[0] += stats.groups
            bar.set_postfix(shard=stats.shard, groups_s=f"{written[0] / (time.time() - t0):.2f}",
                            failed=stats.failed_images)

        with RewardScorer(rewards, cfg.rollouts.reward_workers) as scorer, \
                ShardPipeline(cfg.rollouts.pipeline_depth) as pipe:
            for s in pending:
                generate_shard(s, p, backend, scorer, pipe, task_id, bar, report)
            pipe.drain()
        bar.close()
    return _assemble(p, require=False)


def _assemble(p: Plan, *, require: bool) -> Path:
    done = [s for s in range(p.num_shards) if layout.shard_paths(p.root, s)["stats"].exists()]
    if len(done) < p.num_shards:
        msg = f"{len(done)}/{p.num_shards} shards done; the manifest is assembled when all are"
        if require:
            raise GdroError(msg)
        print(f"rollouts: {msg}", flush=True)
        return p.root
    path = assemble_manifest(p.root)
    print(f"rollouts: all {p.num_shards} shards done; wrote {path}", flush=True)
    return p.root

