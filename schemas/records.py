"""The records of schema v2: the per-group JSON, the per-image Parquet row, the per-shard stats, the manifest."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import READABLE_VERSIONS, SCHEMA_VERSION
from .codec import ShardError, json_bytes

REWARD_PREFIX = "reward_"


@dataclass
class GroupRecord:
    """`<key>.json`: everything about one group that is not an array or an image.

    In memory `metadata` is the prompt's metadata as given; on disk (v2) it is `metadata_json`, its canonical
    JSON as a string: task metadata mixes types (GenEval's `"position": ["below", 0]`) that Arrow, and so the
    Hugging Face `datasets` loader, cannot type, while a string always types and gives the original back."""

    key: str
    prompt_id: int
    prompt: str
    metadata: dict  # task metadata: GenEval include/exclude/tag, ocr_target, ...
    seeds: list[int]  # one per member
    rewards: dict[str, list[float | None]]  # raw score per reward name and member; None where it failed
    status: list[str]  # "ok" | "error" per member
    errors: list[str]  # "" where ok
    image_sha256: list[str]
    ref_t: list[float] = field(default_factory=list)  # K cached draws: t_k
    ref_noise_seeds: list[int] = field(default_factory=list)  # K noise seeds s_k (noise shared by the group)
    ref_errors: list[list[float]] = field(default_factory=list)  # [K][G] reference flow-matching errors
    schema_version: int = SCHEMA_VERSION

    @property
    def group_size(self) -> int:
        return len(self.seeds)

    def to_json(self) -> dict:
        obj = asdict(self)
        obj["metadata_json"] = json_bytes(obj.pop("metadata")).decode()
        obj["schema_version"] = SCHEMA_VERSION
        return obj

    @classmethod
    def from_json(cls, obj: dict, where: str) -> GroupRecord:
        if not isinstance(obj, dict):
            raise ShardError(f"{where}: json member is not an object")
        version = obj.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ShardError(f"{where}: field schema_version is {version!r}; this gdro reads schema "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade gdro, or regenerate the dataset)")
        obj = dict(obj)
        if version >= 2:  # metadata as a JSON string (see the class docstring)
            text = obj.pop("metadata_json", None)
            try:
                obj["metadata"] = json.loads(text) if isinstance(text, str) else None
            except json.JSONDecodeError:
                obj["metadata"] = None
            if not isinstance(obj["metadata"], dict):
                raise ShardError(f"{where}: field metadata_json is not the JSON text of an object")
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(obj))
        if missing:
            raise ShardError(f"{where}: json member lacks field(s) {', '.join(missing)}")
        rec = cls(**{k: obj[k] for k in names})
        g = len(rec.seeds)
        for fname in ("status", "errors", "image_sha256"):
            if len(getattr(rec, fname)) != g:
                raise ShardError(f"{where}: field {fname} has {len(getattr(rec, fname))} entries, expected G={g}")
        for name, values in rec.rewards.items():
            if len(values) != g:
                raise ShardError(f"{where}: field rewards.{name} has {len(values)} entries, expected G={g}")
        if not (len(rec.ref_t) == len(rec.ref_noise_seeds) == len(rec.ref_errors)):
            raise ShardError(f"{where}: fields ref_t, ref_noise_seeds, ref_errors disagree on K")
        if any(len(row) != g for row in rec.ref_errors):
            raise ShardError(f"{where}: field ref_errors rows must each have G={g} entries")
        return rec


def parquet_schema(reward_names: list[str]):
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("group", pa.int32()), ("member", pa.int32()), ("prompt_id", pa.int64()),
        ("prompt", pa.string()), ("tag", pa.string()), ("seed", pa.int64()),
        *[(REWARD_PREFIX + n, pa.float64()) for n in sorted(reward_names)],
        ("status", pa.string()), ("error", pa.string()), ("image_sha256", pa.string()),
        ("metadata_json", pa.string()),
    ])


def parquet_rows(records: list[GroupRecord], reward_names: list[str]) -> dict[str, list]:
    """Column dict of one row per image (failures are rows too)."""
    cols: dict[str, list] = {f.name: [] for f in parquet_schema(reward_names)}
    for gi, rec in enumerate(records):
        for m in range(rec.group_size):
            cols["key"].append(rec.key)
            cols["group"].append(gi)
            cols["member"].append(m)
            cols["prompt_id"].append(rec.prompt_id)
            cols["prompt"].append(rec.prompt)
            cols["tag"].append(str(rec.metadata.get("tag", "")))
            cols["seed"].append(rec.seeds[m])
            for n in sorted(reward_names):
                cols[REWARD_PREFIX + n].append(rec.rewards[n][m])
            cols["status"].append(rec.status[m])
            cols["error"].append(rec.errors[m])
            cols["image_sha256"].append(rec.image_sha256[m])
            cols["metadata_json"].append(json_bytes(rec.metadata).decode())
    return cols


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardStats:
    """`<shard>.stats.json`, written last: the shard's completion marker and the progress feed."""

    shard: str
    groups: int
    images: int
    failed_images: int
    reward_means: dict[str, float | None]
    tar_sha256: str
    tar_bytes: int
    parquet_sha256: str
    parquet_bytes: int
    fingerprint: str
    seconds: float
    task_id: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: sampling, rewards, ...
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def load(cls, path: Path) -> ShardStats:
        try:
            obj = json.loads(Path(path).read_text())
            return cls(**obj)
        except (json.JSONDecodeError, TypeError) as e:
            raise ShardError(f"{path}: not a valid stats file ({e}); delete it and rerun rollouts to redo the "
                             f"shard") from None


def reward_mean(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(ok)) if ok else None
