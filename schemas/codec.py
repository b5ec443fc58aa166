"""Bytes <-> values for shard members, with no pickle anywhere.

Decoding is by whitelist: JSON, ``.npy`` (``allow_pickle=False``; object arrays are refused) and PNG/WebP.
Any other member (``.pkl``, ``.pth``, ...) is refused with an error that names the shard, key and member:
data from another team must never be able to run code here.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np

from .layout import ARRAY_MEMBERS, IMAGE_EXTS, JSON_MEMBER


class ShardError(ValueError):
    """A shard or member that breaks the contract. The message names the file, the key and the field."""


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def image_bytes(img: np.ndarray, ext: str) -> bytes:
    """uint8 HWC -> PNG or lossless WebP bytes (deterministic for a given Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    if ext == "png":
        Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    elif ext == "webp":
        Image.fromarray(img).save(buf, format="WEBP", lossless=True, quality=100, method=4)
    else:
        raise ValueError(f"unknown image format {ext!r}")
    return buf.getvalue()


def image_load(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def json_bytes(obj) -> bytes:
    """Canonical JSON (sorted keys, NaN as null) so identical content gives identical bytes."""
    return json.dumps(_nan_to_none(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def decode_member(name: str, data: bytes, where: str):
    """Decode one member by its name (the part after the key); refuse anything not in the contract."""
    ext = name.rsplit(".", 1)[-1]
    try:
        if name == JSON_MEMBER:
            return json.loads(data)
        if name in ARRAY_MEMBERS:
            arr = npy_load(data)
            if arr.dtype.hasobject:
                raise ShardError(f"{where}: member {name!r} is an object array; only numeric arrays are allowed")
            return arr
        if ext in IMAGE_EXTS and name.split(".", 1)[0].isdigit():
            return image_load(data)
    except ShardError:
        raise
    except Exception as e:  # a corrupt member: say which, keep the cause
        raise ShardError(f"{where}: member {name!r} cannot be decoded ({type(e).__name__}: {e}); "
                         f"the shard is damaged: re-generate it (delete it and its .stats.json, rerun rollouts)") from e
    raise ShardError(f"{where}: member {name!r} is not part of the gdro schema (json, npy, png, webp); refusing "
                     f"to decode it (pickle and other executable formats are never loaded)")
