"""The pre-flight check of a dataset's tars, from the tar headers and the `.npy` headers alone (nothing is
decoded, no image opened): every entry a regular file named `<9 digits>.<member>`, every member one the schema
allows for this manifest, every array of the manifest's dtype and shape, no member cut short, every group
complete, the manifest's group count. `gdro train`, `gdro verify` and `gdro inspect` run it before anything
else, so a hostile or damaged dataset is refused before step one, with one line naming shard, key and member.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .codec import NPY_DTYPE

CLEAN_COPY = "the dataset is refused and nothing in it was decoded or run: ask its publisher for a clean copy"
DAMAGED = "the shard is damaged: re-generate it (delete it and its .stats.json, rerun rollouts) or fetch it again"


@dataclass(frozen=True)
class Problem:
    shard: str  # the shard name (6 digits)
    text: str  # names the file, key and member, and what to do
    hostile: bool  # a member outside the schema (it could carry code), not mere damage

    def __str__(self) -> str:
        return f"shard {self.shard}: {self.text}"


def expected_members(m: dict) -> list[str]:
    """The schema's member names for this manifest (G, image format): the whitelist, not the manifest's copy."""
    return layout.member_names(m["group_size"], layout.image_ext(m["image_format"]))


def _npy_header(f) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"npy format version {version} (gdro writes 1.0)")
    shape, _fortran, dtype = read(f)  # the header is a literal dict: parsing it runs nothing
    return shape, dtype


def _array_problem(member: str, shape: tuple, dtype: np.dtype, m: dict) -> tuple[str, bool] | None:
    if dtype.hasobject:
        return "is an object array (unpickling it could run code)", True
    want = m["latents_dtype"] if member == layout.LATENTS_MEMBER else m["embeds_dtype"]
    if dtype != NPY_DTYPE[want]:
        return f"holds {dtype}, the manifest says {want} (stored as {NPY_DTYPE[want]})", False
    if member == layout.LATENTS_MEMBER and tuple(shape) != (m["group_size"], *m["generator"]["latent_shape"]):
        return (f"has shape {list(shape)}, the manifest says [G={m['group_size']}, "
                f"{', '.join(map(str, m['generator']['latent_shape']))}]"), False
    return None


def scan_tar(src, shard: dict, m: dict) -> Problem | None:
    """The first problem of one shard's tar (`src` a path or a seekable binary file), or None."""
    name, tar_name = shard["name"], shard["tar"]
    expected = expected_members(m)
    allowed = set(expected)
    if isinstance(src, (str, Path)):
        size, opened = os.path.getsize(src), {"name": str(src)}
    else:
        size, opened = src.seek(0, io.SEEK_END), {"fileobj": src}
        src.seek(0)

    def problem(text: str, hostile: bool) -> Problem:
        return Problem(name, f"{tar_name}, {text}; {CLEAN_COPY if hostile else DAMAGED}", hostile)

    groups, current, members = 0, None, []
    try:
        with tarfile.open(mode="r:", **opened) as tf:
            for info in tf:
                key, _, member = info.name.partition(".")
                where = f"key {key}, member {member!r}" if key.isdigit() else f"entry {info.name!r}"
                if not info.isfile():
                    return problem(f"{where} is not a regular file (a link or folder)", True)
                if not (key.isdigit() and len(key) == layout.KEY_DIGITS) or member not in allowed:
                    return problem(f"{where} is not part of the gdro schema (allowed: {', '.join(expected)})", True)
                if info.offset_data + info.size > size:
                    return problem(f"{where} is cut short (the tar is truncated)", False)
                if member in layout.ARRAY_MEMBERS:
                    try:
                        shape, dtype = _npy_header(tf.extractfile(info))
                    except ValueError as e:
                        return problem(f"{where} has no valid .npy header ({e})", False)
                    bad = _array_problem(member, shape, dtype, m)
                    if bad:
                        return problem(f"{where} {bad[0]}", bad[1])
                if key != current:
                    if current is not None and members != expected:
                        return problem(f"key {current} holds members {members}, the schema wants {expected}", False)
                    if current is not None and key <= current:
                        return problem(f"key {key} comes after key {current} (keys must be unique, ascending)",
                                       False)
                    current, members, groups = key, [], groups + 1
                members.append(member)
    except tarfile.TarError as e:
        return problem(f"is not a readable tar ({e})", False)
    if current is not None and members != expected:
        return problem(f"key {current} holds members {members}, the schema wants {expected}", False)
    if groups != shard["groups"]:
        return problem(f"holds {groups} groups, the manifest says {shard['groups']}", False)
    return None


def manifest_problem(m: dict) -> str | None:
    """A manifest whose member list is not the schema's for its G and image format (edited by hand?)."""
    if m.get("member_names") != expected_members(m):
        return (f"manifest field member_names {m.get('member_names')} is not the schema's {expected_members(m)}; "
                f"{CLEAN_COPY}")
    return None


def scan_dataset(root: Path, m: dict) -> list[Problem]:
    """The first problem of every local shard whose tar exists (a missing tar is the checksum check's to name)."""
    out = []
    for sh in m["shards"]:
        path = Path(root) / sh["tar"]
        if path.is_file():
            found = scan_tar(path, sh, m)
            if found:
                out.append(found)
    return out
