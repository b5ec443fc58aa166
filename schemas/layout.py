"""Where things live in a dataset folder, how keys and member names are spelled, and how shards map to work.

    <dataset>/manifest.json, README.md, rollouts_config.json
    <dataset>/shards/000000.tar | .parquet | .stats.json (the stats file is written last: completion marker)
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

SHARDS = "shards"
MANIFEST = "manifest.json"
CARD = "README.md"
RUN_CONFIG = "rollouts_config.json"  # the fingerprinted generation config, written when a dataset is started
TMP_PREFIX = ".tmp-"  # unfinished files; never under a final name
KEY_DIGITS = 9

# Per-group members besides the images. Every sample of a dataset has the same member names.
JSON_MEMBER = "json"
LATENTS_MEMBER = "latents.npy"  # [G, C, H, W] in the manifest's latents_dtype: what stage two trains on
PROMPT_EMBEDS_MEMBER = "prompt_embeds.npy"  # [L, D] in the manifest's embeds_dtype, once per group
POOLED_EMBEDS_MEMBER = "pooled_embeds.npy"  # [P] in the manifest's embeds_dtype, once per group
ARRAY_MEMBERS = (LATENTS_MEMBER, PROMPT_EMBEDS_MEMBER, POOLED_EMBEDS_MEMBER)
IMAGE_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpg"}  # rollouts.image_format -> member extension
IMAGE_EXTS = tuple(IMAGE_FORMATS.values())


def shard_name(index: int) -> str:
    return f"{index:06d}"


def shard_paths(root: Path, index: int) -> dict[str, Path]:
    base = Path(root) / SHARDS / shard_name(index)
    return {"tar": base.with_suffix(".tar"), "parquet": base.with_suffix(".parquet"),
            "stats": base.with_suffix(".stats.json")}


def tmp_path(final: Path) -> Path:
    return final.with_name(TMP_PREFIX + final.name)


def group_key(prompt_id: int) -> str:
    """Digits only (no dots: WebDataset splits a member name at its first dot)."""
    return f"{prompt_id:0{KEY_DIGITS}d}"


def image_member(member: int, ext: str) -> str:
    return f"{member}.{ext}"


def image_ext(image_format: str) -> str:
    return IMAGE_FORMATS[image_format]


def member_names(group_size: int, image_ext: str) -> list[str]:
    """The member names (after the key) every sample of a dataset carries, sorted as the tar stores them."""
    return sorted([JSON_MEMBER, *ARRAY_MEMBERS, *(image_member(m, image_ext) for m in range(group_size))])


def num_shards(num_prompts: int, prompts_per_shard: int) -> int:
    return -(-num_prompts // prompts_per_shard)


def shard_prompt_ids(index: int, num_prompts: int, prompts_per_shard: int) -> range:
    """Shard s holds prompts [s*P, (s+1)*P) of the frozen prompt list."""
    return range(index * prompts_per_shard, min((index + 1) * prompts_per_shard, num_prompts))


def shards_of_task(task_id: int, num_tasks: int, total: int) -> list[int]:
    """Task t of T writes the shards s with s % T == t."""
    return [s for s in range(total) if s % num_tasks == task_id]


def atomic_write(path: Path, data: bytes, *, shared: bool = False) -> None:
    """Write under a temporary name, fsync, rename: a final name never holds a partial file.

    `shared`: several tasks may write this file at once (run config, manifest), so each uses its own
    temporary name (a random suffix); shard files keep the plain `.tmp-<name>` their cleanup looks for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    if shared:
        tmp = tmp.with_name(f"{tmp.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
