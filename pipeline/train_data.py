"""Stage two's reader: a WebDataset pipeline over the shards that yields batches of whole groups.

Shards are resampled with replacement per rank and worker (seeded by rank, worker, seed and the step the run
starts from), so no rank can starve or hang however few shards there are; the decoding is our own whitelist
(`schemas.manifest.decode_group`: JSON and .npy without pickle; images are not decoded at all: training needs
latents only). The reward mix is applied here; a group with a failed reward that the mix needs is kept in the
batch but marked invalid, so it is counted, never silently dropped, and never trained on.

`order="sequential"` (train.data_order) replaces the resampling by a fixed schedule: all groups in key order,
cycling, the global batch of step s a function of s alone, each rank taking its contiguous slice. 1 rank with
2m groups per step then sees what 2 ranks with m each see together (the distributed test relies on it).

Before step one, `check_datasets` refuses what would fail later: the manifest, the rewards the mix needs, the
checksums, the header scan (`schemas/scan.py`). Arrays of any storage dtype are read as float32. train.dataset
may be a URL (each shard fetched whole, checked and scanned before use: `ShardOpener`) or a list of datasets
of one generator, mixed per group by train.dataset_weights (`MixedSources`).
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from schemas import layout
from schemas.codec import ShardError, json_bytes
from schemas.manifest import array_dtypes, decode_group, load_manifest
from schemas.records import sha256_bytes

from .errors import GdroError
from .remote import fetch_shard, is_url, join, load_manifest_url


def mixed_rewards(raw: dict[str, list], weights: dict[str, float], where: str) -> tuple[np.ndarray, bool]:
    """sum_name weight * raw reward, per member; (rewards, valid). Invalid if any needed score is missing."""
    missing = [n for n in weights if n not in raw]
    if missing:
        raise GdroError(f"train.reward_weights names {', '.join(missing)}, but {where} stores only "
                        f"{', '.join(sorted(raw))}")
    g = len(next(iter(raw.values())))
    total = np.zeros(g, np.float64)
    valid = True
    for name, w in weights.items():
        vals = np.array([np.nan if v is None else v for v in raw[name]], np.float64)
        if not np.isfinite(vals).all():
            valid = False
        total += w * np.nan_to_num(vals)
    return total, valid


def _to_item(sample: dict, weights: dict[str, float], dtypes: dict[str, str]) -> dict:
    key = sample["__key__"]
    where = sample.get("__url__", "shard")
    raw = {k: v for k, v in sample.items() if not k.startswith("__") and not k.split(".")[-1] in layout.IMAGE_EXTS}
    rec, arrays = decode_group(key, raw, where, dtypes)  # arrays as float32 whatever their storage dtype
    rewards, valid = mixed_rewards(rec.rewards, weights, f"{where}, key {key}")
    return {
        "key": key,
        "latents": torch.from_numpy(arrays[layout.LATENTS_MEMBER]),
        "prompt_embeds": torch.from_numpy(arrays[layout.PROMPT_EMBEDS_MEMBER]),
        "pooled_embeds": torch.from_numpy(arrays[layout.POOLED_EMBEDS_MEMBER]),
        "rewards": torch.from_numpy(rewards),
        "valid": valid,
        "ref_t": torch.tensor(rec.ref_t, dtype=torch.float32),
        "ref_noise_seeds": list(rec.ref_noise_seeds),
        "ref_errors": torch.tensor(rec.ref_errors, dtype=torch.float64).reshape(len(rec.ref_t), rec.group_size),
    }


def collate_groups(items: list[dict]) -> dict:
    return {
        "keys": [it["key"] for it in items],
        "latents": torch.stack([it["latents"] for it in items]),  # [N, G, C, H, W]
        "prompt_embeds": torch.stack([it["prompt_embeds"] for it in items]),  # [N, L, D]
        "pooled_embeds": torch.stack([it["pooled_embeds"] for it in items]),  # [N, P]
        "rewards": torch.stack([it["rewards"] for it in items]),  # [N, G] float64
        "valid": torch.tensor([it["valid"] for it in items]),
        "ref_t": torch.stack([it["ref_t"] for it in items]),  # [N, K]
        "ref_noise_seeds": [it["ref_noise_seeds"] for it in items],
        "ref_errors": torch.stack([it["ref_errors"] for it in items]),  # [N, K, G]
    }


def shard_urls(root: Path | str) -> tuple[dict, list[str]]:
    """The manifest and its shards' tar locations (paths, or URLs for a dataset at a URL)."""
    if is_url(root):
        try:
            manifest, _ = load_manifest_url(str(root))
        except ShardError as e:
            raise GdroError(f"train.dataset: {e}") from None
        return manifest, [join(str(root), sh["tar"]) for sh in manifest["shards"]]
    try:
        manifest = load_manifest(root)
    except ShardError as e:
        raise GdroError(f"train.dataset: {e}") from None
    urls = [str(Path(root) / sh["tar"]) for sh in manifest["shards"]]
    for u in urls:
        if not Path(u).is_file():
            raise GdroError(f"train.dataset: shard {u} listed in the manifest is missing; run `gdro verify {root}`")
    return manifest, urls


class ShardOpener:
    """Opens a shard for reading: a local file as it is (checked before step one); a remote one fetched whole,
    checked against the manifest's sha256 and scanned before any of its groups is used (pipeline/remote.py)."""

    def __init__(self, root, manifest: dict):
        self.base, self.manifest = str(root), manifest
        self.remote = {join(self.base, sh["tar"]): sh for sh in manifest["shards"]} if is_url(root) else {}

    def __call__(self, url: str):
        if url in self.remote:
            return io.BytesIO(fetch_shard(self.base, self.remote[url], self.manifest))
        return open(url, "rb")  # the caller closes it


def check_dataset(root: Path | str, weights: dict[str, float], *, verify: bool) -> dict:
    """Refuse, before any training step, a dataset whose schema version is unknown, that lacks a reward the mix
    needs, whose shards do not match their manifest checksums (when `verify`), or whose tars hold a member outside
    the schema or are damaged (the header scan, always: it decodes nothing, and catches what a publisher who
    recomputed the checksums slipped in)."""
    from schemas.manifest import checksum_problems
    from schemas.scan import manifest_problem, scan_dataset

    manifest, _ = shard_urls(root)
    if bad := manifest_problem(manifest):
        raise GdroError(f"train.dataset {root}: {bad}")
    stored = [r["name"] for r in manifest["rewards"]]
    missing = [n for n in weights if n not in stored]
    if missing:
        raise GdroError(f"train.reward_weights names {', '.join(missing)}, but {root} stores only "
                        f"{', '.join(stored)} (rewards are chosen at rollout time: rollouts.rewards)")
    if is_url(root):  # each remote shard is checked and scanned when it is fetched (ShardOpener)
        print(f"data: {root} is remote: each shard is checked against the manifest's sha256 as it is read",
              flush=True)
        return manifest
    if verify and (problems := checksum_problems(Path(root), manifest)):
        raise GdroError(f"train.dataset {root} fails its checksums: {'; '.join(problems)}. Run `gdro verify "
                        f"{root}`, regenerate the bad shards (rerun rollouts), or set train.verify_shards=false")
    if problems := scan_dataset(Path(root), manifest):
        more = f" ({len(problems) - 1} more shard(s): `gdro verify {root}` lists them)" if len(problems) > 1 else ""
        raise GdroError(f"train.dataset {root}: {problems[0]}{more}")
    return manifest


def _tar_samples(opener: ShardOpener):
    """webdataset's tarfile_to_samples, but the shards are opened by `opener`: under WDS_SECURE=1 (which this
    project asks for) webdataset's gopen refuses every local path, and a remote shard is checked first."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def opened(urls):
        for s in urls:
            with opener(s["url"]) as stream:
                yield dict(s, stream=stream)

    return lambda src: group_by_keys(tar_file_expander(opened(src), handler=reraise_exception),
                                     handler=reraise_exception)


class SequentialBatches:
    """Endless batches in a fixed order: global batch s holds groups (s*B + j) mod N, j < B = groups x world, of
    all N groups in key order (shards in index order; a shard's tar holds its keys in order; several datasets one
    after the other); rank r takes j in [r*groups, (r+1)*groups). Every rank reads every shard but decodes only
    its own slice."""

    def __init__(self, shards: list[tuple[str, ShardOpener, dict]], *, groups: int, weights: dict[str, float],
                 rank: int, world: int):
        self.shards, self.groups, self.weights = shards, groups, weights  # (url, its opener, its dtypes)
        self.rank, self.world = rank, world

    def __iter__(self):
        from schemas.manifest import iter_tar_groups

        def cycle():
            while True:
                for url, opener, dtypes in self.shards:
                    with opener(url) as stream:
                        for key, raw in iter_tar_groups(stream):
                            yield url, key, raw, dtypes

        stream = cycle()
        lo, hi = self.rank * self.groups, (self.rank + 1) * self.groups
        while True:
            items = []
            for j in range(self.groups * self.world):
                url, key, raw, dtypes = next(stream)
                if lo <= j < hi:
                    items.append(_to_item({"__key__": key, "__url__": url, **raw}, self.weights, dtypes))
            yield collate_groups(items)


class MixedSources(torch.utils.data.IterableDataset):
    """Groups drawn from several datasets' streams, each group's source chosen with probability `probs`, by a
    generator seeded with the run seed and the rank/worker: the same stream on resume."""

    def __init__(self, sources: list, probs: list[float], seed: int, worker_seed):
        self.sources, self.probs, self.seed, self.worker_seed = sources, probs, seed, worker_seed

    def __iter__(self):
        rng = random.Random(f"{self.seed}:{self.worker_seed()}:mix")
        streams = [iter(s) for s in self.sources]
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights=self.probs)[0]])


def dataset_list(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, (str, Path)) else list(spec)


def generator_hash(m: dict) -> str:
    """16 hex digits of the sha256 of the manifest's generator record, its local model_path aside: datasets
    with the same hash were sampled from the same weights, dtype, shapes and guidance mode."""
    return sha256_bytes(json_bytes({k: v for k, v in m["generator"].items() if k != "model_path"}))[:16]


def check_datasets(spec: str | list[str], weights: dict[str, float], *, verify: bool,
                   mix: list[float] = ()) -> dict:
    """`check_dataset` on each dataset of train.dataset, then refuse a mix of different generators (both hashes
    named), group sizes or reference caches; the first manifest stands for the mix."""
    roots = dataset_list(spec)
    if not roots:
        raise GdroError("train.dataset is an empty list: name at least one dataset")
    if mix and len(mix) != len(roots):
        raise GdroError(f"train.dataset_weights has {len(mix)} entries for {len(roots)} datasets in train.dataset")
    manifests = [check_dataset(r, weights, verify=verify) for r in roots]
    first = manifests[0]
    for root, m in zip(roots[1:], manifests[1:]):
        if generator_hash(m) != generator_hash(first):
            raise GdroError(f"train.dataset mixes generators: {roots[0]} was made by generator {generator_hash(first)}, "
                            f"{root} by {generator_hash(m)} (sha256 of their manifests' generator records); "
                            f"train on datasets of one generator")
        for what, a, b in (("group_size", first["group_size"], m["group_size"]),
                           ("reference_cache.K", first["reference_cache"]["K"], m["reference_cache"]["K"])):
            if a != b:
                raise GdroError(f"train.dataset: {roots[0]} has {what} {a}, {root} has {b}; a mix needs the same")
    return first


def group_batches(spec: Path | str | list[str], *, groups: int, weights: dict[str, float], seed: int, rank: int,
                  world: int, workers: int, shuffle_buffer: int, order: str = "shuffled", mix: list[float] = ()):
    """An endless iterable of collated batches of `groups` groups for this rank (`order`: see the module doc);
    several datasets are mixed by `mix` (train.dataset_weights; default: in proportion to their groups)."""
    import webdataset as wds

    sources = [(root, *shard_urls(root)) for root in dataset_list(spec)]  # (root, manifest, shard urls)
    manifest = sources[0][1]
    if order == "sequential":
        if mix:
            raise GdroError("train.dataset_weights needs train.data_order=shuffled (sequential reads every dataset "
                            "in turn)")
        if not sum(int(sh["groups"]) for _, m, _ in sources for sh in m["shards"]):
            raise GdroError(f"train.dataset {spec} holds no groups")
        shards = []
        for root, m, urls in sources:
            opener, dtypes = ShardOpener(root, m), array_dtypes(m)
            shards += [(u, opener, dtypes) for _, u in sorted(zip(m["shards"], urls), key=lambda su: su[0]["name"])]
        return manifest, SequentialBatches(shards, groups=groups, weights=weights, rank=rank, world=world)
    assert order == "shuffled", order
    slots = world * max(1, workers)
    for root, _, urls in sources:
        if len(urls) < slots:
            print(f"data: {len(urls)} shards of {root} for {world} ranks x {max(1, workers)} workers: every rank and "
                  f"worker resamples shards with replacement, so none starves (groups repeat sooner)", flush=True)
    run_seed = seed * 1_000_003  # the same stream on resume: the trainer skips the batches already used

    def worker_seed():
        info = torch.utils.data.get_worker_info()
        return rank * 1000 + (info.id if info else 0)

    def groups_of(d: int, root, m: dict, urls: list[str]):
        dtypes = array_dtypes(m)
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=run_seed + d, worker_seed=worker_seed, deterministic=True),
            _tar_samples(ShardOpener(root, m)),
            wds.map(lambda s: _to_item(s, weights, dtypes)))

    streams = [groups_of(d, *src) for d, src in enumerate(sources)]
    probs = list(mix) or [sum(sh["groups"] for sh in m["shards"]) for _, m, _ in sources]
    pipeline = wds.DataPipeline(
        streams[0] if len(streams) == 1 else MixedSources(streams, probs, run_seed, worker_seed),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 16), seed=run_seed + rank),
        wds.batched(groups, collation_fn=collate_groups, partial=False),
    )
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                         persistent_workers=workers > 0)
    return manifest, loader
