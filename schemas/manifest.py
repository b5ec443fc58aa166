"""The manifest and dataset card, assembled from the writer's identity record and the per-shard stats files;
and the reader's checks of a whole dataset (`verify_dataset`)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from . import SCHEMA_VERSION, layout
from .codec import ShardError, decode_member
from .records import GroupRecord, ShardStats, sha256_bytes, sha256_file


def _atomic_write_text(path: Path, text: str) -> None:
    layout.atomic_write(path, text.encode(), shared=True)  # the last tasks may all assemble at once


def assemble_manifest(root: Path) -> Path:
    """Write manifest.json and README.md from rollouts_config.json and every shard's stats (idempotent)."""
    root = Path(root)
    run = json.loads((root / layout.RUN_CONFIG).read_text())
    ident = run["identity"]
    shards = []
    for s in range(ident["num_shards"]):
        st = ShardStats.load(layout.shard_paths(root, s)["stats"])
        shards.append({"name": st.shard, "tar": f"{layout.SHARDS}/{st.shard}.tar", "sha256": st.tar_sha256,
                       "bytes": st.tar_bytes, "parquet": f"{layout.SHARDS}/{st.shard}.parquet",
                       "parquet_sha256": st.parquet_sha256, "parquet_bytes": st.parquet_bytes,
                       "groups": st.groups, "images": st.images, "failed_images": st.failed_images})
    manifest = {
        **ident,
        "fingerprint": run["fingerprint"],
        "code_version": run["code_version"],
        "library_versions": run["library_versions"],
        "member_names": layout.member_names(ident["group_size"], ident["image_format"]),
        "totals": {"shards": len(shards), "groups": sum(s["groups"] for s in shards),
                   "images": sum(s["images"] for s in shards),
                   "failed_images": sum(s["failed_images"] for s in shards)},
        "shards": shards,
    }
    path = root / layout.MANIFEST
    _atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    _atomic_write_text(root / layout.CARD, dataset_card(manifest))
    return path


def dataset_card(m: dict) -> str:
    g = m["generator"]
    rewards = ", ".join(f"`{r['name']}` v{r['version']}" for r in m["rewards"])
    ref = m["reference_cache"]
    return f"""---
pretty_name: gdro group rollouts ({g['backend']})
task_categories: [text-to-image]
tags: [gdro, group-preference, webdataset, rectified-flow]
size_categories: [n<1M]
configs:
- config_name: default
  data_files:
  - split: train
    path: "shards/*.tar"
---
# gdro group rollouts

Stage-one output of [gdro](https://pypi.org/project/gdro/) (schema v{m['schema_version']}): one WebDataset
sample per prompt holding its G = {m['group_size']} images, their latents and conditioning, the raw score of
every reward, and the reference model's cached flow-matching errors. One Parquet row per image beside each tar.

| | |
|---|---|
| generator | `{g['backend']}` from `{g['model_path']}` ({g['dtype']}), latents {g['latent_shape']} |
| sampler | {m['sampler']['scheduler']}, {m['sampler']['steps']} steps, shift {m['sampler']['shift']}, guidance {m['sampler']['guidance']} |
| prompts | `{m['prompts']['source']}`: {m['prompts']['count']} prompts, sha256 `{m['prompts']['sha256'][:16]}...` |
| groups / images | {m['totals']['groups']} / {m['totals']['images']} ({m['totals']['failed_images']} failed, kept as rows) |
| shards | {m['totals']['shards']} of {m['prompts_per_shard']} prompts |
| rewards (raw) | {rewards} |
| reference cache | K = {ref['K']}, t ~ {ref['t_law']} on [{ref['t_min']}, {ref['t_max']}] |
| seeds | base seed {m['seed_scheme']['base_seed']}; {m['seed_scheme']['scheme']} |
| fingerprint | `{m['fingerprint']}` |
| made by | {m['code_version']} |

Members of each sample: {', '.join(f'`{n}`' for n in m['member_names'])}.
No pickle anywhere: read with `WDS_SECURE=1`, `numpy.load(allow_pickle=False)`. Check it with `gdro verify`.
"""


def load_manifest(root: Path) -> dict:
    path = Path(root) / layout.MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} does not exist: the dataset is unfinished (run `gdro status {root}`) or this is "
                         f"not a gdro dataset folder")
    m = json.loads(path.read_text())
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: field schema_version is {m.get('schema_version')!r}; this gdro reads schema "
                         f"{SCHEMA_VERSION}")
    return m


def iter_tar_groups(path: Path):
    """Yield (key, {member: raw bytes}) per sample of a tar, in order, with plain `tarfile` (no webdataset)."""
    current, members = None, {}
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            if not info.isfile():
                raise ShardError(f"{path}: entry {info.name!r} is not a regular file")
            key, _, member = info.name.partition(".")
            if not key.isdigit() or not member:
                raise ShardError(f"{path}: entry {info.name!r} is not <digits>.<member>")
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            members[member] = tf.extractfile(info).read()
    if current is not None:
        yield current, members


def decode_group(key: str, raw: dict[str, bytes], where: str) -> tuple[GroupRecord, dict]:
    """Decode and check one sample: the record, plus arrays and images by member name."""
    here = f"{where}, key {key}"
    decoded = {name: decode_member(name, data, here) for name, data in sorted(raw.items())}
    if layout.JSON_MEMBER not in decoded:
        raise ShardError(f"{here}: member 'json' is missing")
    rec = GroupRecord.from_json(decoded.pop(layout.JSON_MEMBER), here)
    if rec.key != key:
        raise ShardError(f"{here}: field key is {rec.key!r}, but the tar key is {key!r}")
    return rec, decoded


def checksum_problems(root: Path, m: dict) -> list[str]:
    """Shards whose tar or Parquet is missing or differs from the manifest's sha256 (no decoding)."""
    problems = []
    for sh in m["shards"]:
        for kind, digest in (("tar", sh["sha256"]), ("parquet", sh["parquet_sha256"])):
            path = Path(root) / sh[kind]
            if not path.is_file():
                problems.append(f"shard {sh['name']}: {sh[kind]} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"shard {sh['name']}: {sh[kind]} sha256 differs from the manifest (corrupt or replaced)")
    return problems


def verify_dataset(root: Path) -> list[str]:
    """Every problem found, each naming the shard and what is wrong (empty list: the dataset is sound)."""
    root = Path(root)
    try:
        m = load_manifest(root)
    except ShardError as e:
        return [str(e)]
    problems = checksum_problems(root, m)
    expected = m["member_names"]
    image_ext = m["image_format"]
    for sh in m["shards"]:
        tar, pq_path = root / sh["tar"], root / sh["parquet"]
        label = f"shard {sh['name']}"
        if any(p.startswith(f"{label}: {sh['tar']}") for p in problems) or not pq_path.is_file():
            continue  # a missing or altered tar (or a missing Parquet) is reported; its contents are not read
        groups = images = 0
        try:
            for key, raw in iter_tar_groups(tar):
                names = sorted(raw)
                if names != expected:
                    problems.append(f"{label}, key {key}: members {names} differ from the schema's {expected}")
                    continue
                rec, decoded = decode_group(key, raw, str(tar))
                lat = decoded[layout.LATENTS_MEMBER]
                if lat.shape[0] != rec.group_size or lat.dtype.name != m["latents_dtype"]:
                    problems.append(f"{label}, key {key}: latents {lat.shape} {lat.dtype} do not match G="
                                    f"{rec.group_size}, {m['latents_dtype']}")
                for i in range(rec.group_size):
                    if sha256_bytes(raw[layout.image_member(i, image_ext)]) != rec.image_sha256[i]:
                        problems.append(f"{label}, key {key}: image {i} sha256 differs from its record")
                groups += 1
                images += rec.group_size
        except (ShardError, tarfile.TarError) as e:
            problems.append(f"{label}: {e}")
            continue
        if (groups, images) != (sh["groups"], sh["images"]):
            problems.append(f"{label}: holds {groups} groups / {images} images, manifest says "
                            f"{sh['groups']} / {sh['images']}")
        try:
            import pyarrow.parquet as pq

            if pq.read_metadata(pq_path).num_rows != sh["images"]:
                problems.append(f"{label}: {sh['parquet']} has {pq.read_metadata(pq_path).num_rows} rows, "
                                f"expected {sh['images']}")
        except Exception as e:  # noqa: BLE001  any reader failure is a problem to report, not a crash
            problems.append(f"{label}: {sh['parquet']} unreadable ({e})")
    return problems
