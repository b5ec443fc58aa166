"""The manifest and dataset card, assembled from the writer's identity record and the per-shard stats files;
and the reader's checks of a whole dataset (`verify_dataset`)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from . import READABLE_VERSIONS, SCHEMA_VERSION, layout
from .codec import ShardError, decode_member, from_storage
from .records import GroupRecord, ShardStats, sha256_bytes, sha256_file
from .scan import manifest_problem, scan_dataset


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
        "member_names": layout.member_names(ident["group_size"], layout.image_ext(ident["image_format"])),
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
    quality = (f" at quality {m['image_quality']} (lossy: not faithful enough to re-score)"
               if m.get("image_quality") else " (lossless)")
    first_reward = f"reward_{m['rewards'][0]['name']}"
    if ":" in first_reward:  # a user scorer's module:function needs quoting in SQL
        first_reward = f'"{first_reward}"'
    bf16 = ("\nbfloat16 arrays are `.npy` uint16 of the bit patterns: `torch.from_numpy(a.view('int16'))"
            ".view(torch.bfloat16)`." if "bfloat16" in (m["latents_dtype"], m["embeds_dtype"]) else "")
    lineage = "".join(f"| rescored | from manifest sha256 `{st['parent_manifest_sha256'][:16]}...` (`{st['parent']}`), "
                      f"added `{st['reward_added']['name']}` v{st['reward_added']['version']}, by "
                      f"{st['code_version']} |\n" for st in m.get("lineage", []))
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
- config_name: rows
  data_files:
  - split: train
    path: "shards/*.parquet"
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
| storage | latents {m['latents_dtype']}, embeddings {m['embeds_dtype']}, images {m['image_format']}{quality} |
{lineage}
Members of each sample: {', '.join(f'`{n}`' for n in m['member_names'])}.
No pickle anywhere: read with `WDS_SECURE=1`, `numpy.load(allow_pickle=False)`. Check it with `gdro verify`.
The group JSON keeps the prompt's metadata as a JSON string (`metadata_json`); `json.loads` gives it back.{bf16}

```python
import json, datasets, duckdb
groups = datasets.load_dataset("webdataset", data_files={{"train": "shards/*.tar"}}, split="train")  # or streaming=True
meta = json.loads(groups[0]["json"]["metadata_json"])
rows = datasets.load_dataset("parquet", data_files={{"train": "shards/*.parquet"}}, split="train")  # one row per image
duckdb.sql("SELECT tag, avg({first_reward}) FROM 'shards/*.parquet' GROUP BY tag").show()
```
"""


def load_manifest(root: Path) -> dict:
    path = Path(root) / layout.MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} does not exist: the dataset is unfinished (run `gdro status {root}`) or this is "
                         f"not a gdro dataset folder")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); the dataset's manifest is damaged: re-assemble it "
                         f"(gdro rollouts --assemble-only) or fetch it again") from None
    return with_v1_defaults(m, path)


def with_v1_defaults(m: dict, where) -> dict:
    """Check the schema version; give a v1 manifest the v2 fields with the values v1 always had."""
    if not isinstance(m, dict) or m.get("schema_version") not in READABLE_VERSIONS:
        version = m.get("schema_version") if isinstance(m, dict) else None
        raise ShardError(f"{where}: field schema_version is {version!r}; this gdro reads schema "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (current: {SCHEMA_VERSION})")
    if m["schema_version"] == 1:
        m = {**m, "embeds_dtype": "float32", "image_quality": 0, "images_rescorable": True}
    return m


def array_dtypes(m: dict) -> dict[str, str]:
    """The storage dtype of each array member (manifest fields latents_dtype, embeds_dtype)."""
    return {layout.LATENTS_MEMBER: m["latents_dtype"], layout.PROMPT_EMBEDS_MEMBER: m["embeds_dtype"],
            layout.POOLED_EMBEDS_MEMBER: m["embeds_dtype"]}


def iter_tar_groups(path):
    """Yield (key, {member: raw bytes}) per sample of a tar (a path, or a binary file read from its start), in
    order, with plain `tarfile` (no webdataset)."""
    current, members = None, {}
    opened = {"name": str(path)} if isinstance(path, (str, Path)) else {"fileobj": path}
    with tarfile.open(mode="r:", **opened) as tf:
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


def decode_group(key: str, raw: dict[str, bytes], where: str,
                 dtypes: dict[str, str] | None = None) -> tuple[GroupRecord, dict]:
    """Decode and check one sample: the record, plus arrays (as float32, from the storage `dtypes` of
    `array_dtypes(manifest)`; float32 if None) and images by member name."""
    here = f"{where}, key {key}"
    decoded = {name: decode_member(name, data, here) for name, data in sorted(raw.items())}
    for name in layout.ARRAY_MEMBERS:
        if name in decoded:
            decoded[name] = from_storage(decoded[name], (dtypes or {}).get(name, "float32"),
                                         f"{here}, member {name!r}")
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
    """Every problem found, each naming the shard and what is wrong (empty list: the dataset is sound). The
    header scan (`scan.py`) comes first; a shard that fails it, or its checksum, is not decoded."""
    root = Path(root)
    try:
        m = load_manifest(root)
    except ShardError as e:
        return [str(e)]
    if bad_manifest := manifest_problem(m):
        return [f"{root / layout.MANIFEST}: {bad_manifest}"]
    problems = checksum_problems(root, m)
    scanned = {p.shard: str(p) for p in scan_dataset(root, m)}
    problems += list(scanned.values())
    image_ext = layout.image_ext(m["image_format"])
    dtypes = array_dtypes(m)
    for sh in m["shards"]:
        tar, pq_path = root / sh["tar"], root / sh["parquet"]
        label = f"shard {sh['name']}"
        if sh["name"] in scanned or any(p.startswith(f"{label}: {sh['tar']}") for p in problems) \
                or not pq_path.is_file():
            continue  # reported already; its contents are not decoded
        groups = images = 0
        try:
            for key, raw in iter_tar_groups(tar):
                rec, _ = decode_group(key, raw, str(tar), dtypes)  # decodes every member, checks each array
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
