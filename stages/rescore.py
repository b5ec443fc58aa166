"""Recipe, `gdro rescore`: add a reward to a finished dataset from its stored images, into a new revision.

parent checked (header scan, checksums, lossless images, reward not there yet) -> the new folder's identity (the
parent's, plus the reward, plus the lineage: parent manifest sha256, reward identity with its engine version,
code version) -> for each shard not yet done: decode the parent's images, score them, write a tar whose group
JSON carries the new scores (every other member copied byte for byte) and a Parquet file with the new column,
stats last -> the manifest. The parent's files are only read. A restart skips finished shards, so a killed
rescore resumes and ends with the bytes of an uninterrupted one.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from pipeline.dataset_identity import code_version, record_identity, shard_is_complete
from pipeline.errors import GdroError
from pipeline.remote import is_url, mirror
from pipeline.reward_scoring import score  # one scoring rule (a failing image fails its row, never the shard)
from pipeline.rewards import make_reward, reward_identity
from pipeline.shard_writer import write_shard
from schemas import SCHEMA_VERSION, layout
from schemas.codec import ShardError, json_bytes
from schemas.manifest import (
    array_dtypes,
    assemble_manifest,
    checksum_problems,
    decode_group,
    iter_tar_groups,
    load_manifest,
)
from schemas.records import sha256_file
from schemas.scan import manifest_problem, scan_dataset

ASSEMBLED = ("fingerprint", "code_version", "library_versions", "member_names", "totals", "shards")


def parse_reward(text: str) -> tuple[str, dict]:
    """`NAME` or `NAME=PARAMS`, PARAMS a YAML mapping (`pickscore={path: models/pickscore}`)."""
    name, sep, params = text.partition("=")
    value = yaml.safe_load(params) if sep else {}
    if not name or not isinstance(value, dict):
        raise GdroError(f"--reward {text!r}: expected NAME or NAME={{param: value, ...}} (a YAML mapping)")
    return name, value


def _parent(root: Path) -> dict:
    try:
        m = load_manifest(root)
    except ShardError as e:
        raise GdroError(str(e)) from None
    problems = ([f"{root / layout.MANIFEST}: {bad}"] if (bad := manifest_problem(m)) else []) or \
        [str(p) for p in scan_dataset(root, m)] or checksum_problems(root, m)
    if problems:
        raise GdroError(f"{root} cannot be rescored: {problems[0]}")
    if not m["images_rescorable"]:
        raise GdroError(f"{root} stores lossy image previews ({m['image_format']} at quality {m['image_quality']}): "
                        f"not faithful enough to re-score; rescore the dataset they were made from")
    return m


def new_identity(parent_root: Path, source: str, parent: dict, reward: dict) -> dict:
    if reward["name"] in {r["name"] for r in parent["rewards"]}:
        raise GdroError(f"--reward {reward['name']}: {source} already stores it; choose another reward")
    ident = {k: v for k, v in parent.items() if k not in ASSEMBLED}
    step = {"parent": source, "parent_manifest_sha256": sha256_file(parent_root / layout.MANIFEST),
            "parent_fingerprint": parent["fingerprint"], "parent_code_version": parent["code_version"],
            "reward_added": reward, "code_version": code_version()}
    return {**ident, "schema_version": SCHEMA_VERSION, "rewards": [*parent["rewards"], reward],
            "lineage": [*parent.get("lineage", []), step]}


def rescore_shard(index: int, parent_root: Path, parent: dict, out: Path, reward, names: list[str],
                  fingerprint: str) -> None:
    t0 = time.time()
    sh = parent["shards"][index]
    ext = layout.image_ext(parent["image_format"])
    records, samples = [], []
    for key, raw in iter_tar_groups(parent_root / sh["tar"]):
        rec, decoded = decode_group(key, raw, sh["tar"], array_dtypes(parent))
        images = np.stack([decoded[layout.image_member(i, ext)] for i in range(rec.group_size)])
        scores, errors = score([reward], images, [rec.prompt] * rec.group_size, [rec.metadata] * rec.group_size)
        errs = ["; ".join([e for e in (old, *new) if e]) for old, new in zip(rec.errors, errors)]
        rec = replace(rec, rewards={**rec.rewards, reward.name: scores[reward.name]}, errors=errs,
                      status=["error" if e else "ok" for e in errs], schema_version=SCHEMA_VERSION)
        records.append(rec)
        samples.append({**raw, "__key__": key, layout.JSON_MEMBER: json_bytes(rec.to_json())})
    mark = time.time()
    write_shard(out, index, records, samples, names, fingerprint=fingerprint, task_id=0, t0=t0,
                timings={"rewards": mark - t0}, mark=mark)


def main(dataset: Path | str, reward_text: str, out: Path) -> Path:
    """`dataset` a folder or a URL (mirrored first into `<out>.parent-mirror`, each file checked as it arrives;
    removed when the rescore is done)."""
    source, out = str(dataset), Path(out)
    mirror_dir = None
    if is_url(source):
        mirror_dir = out.with_name(out.name + ".parent-mirror")
        print(f"rescore: fetching {source} into {mirror_dir}", flush=True)
        try:
            dataset = mirror(source, mirror_dir)
        except ShardError as e:
            raise GdroError(str(e)) from None
    dataset = Path(dataset)
    if out.resolve() == dataset.resolve():
        raise GdroError(f"--out {out} is the dataset itself: a rescore writes a new revision, never in place")
    name, params = parse_reward(reward_text)
    parent = _parent(dataset)
    ident = new_identity(dataset, source, parent, reward_identity(name, params))
    fingerprint = record_identity(out, ident, {"rescore": {"dataset": str(dataset), "reward": name,
                                                           "params": params}},
                                  "rerun the same gdro rescore to resume")
    names = sorted(r["name"] for r in ident["rewards"])
    pending = [s for s in range(parent["num_shards"]) if not shard_is_complete(out, s, fingerprint)]
    print(f"rescore: {dataset} + {name} -> {out}: {parent['num_shards'] - len(pending)} shards already done, "
          f"{len(pending)} to score", flush=True)
    if pending:
        reward = make_reward(name, params)
        for s in tqdm(pending, desc="rescore", unit="shard", dynamic_ncols=True):
            rescore_shard(s, dataset, parent, out, reward, names, fingerprint)
    path = assemble_manifest(out)
    if mirror_dir is not None:
        shutil.rmtree(mirror_dir)
    print(f"rescore: wrote {path} (parent manifest sha256 {ident['lineage'][-1]['parent_manifest_sha256'][:16]}...)",
          flush=True)
    return out
