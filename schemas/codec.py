"""Bytes <-> values for shard members, with no pickle anywhere.

Decoding is by whitelist: JSON, ``.npy`` (``allow_pickle=False``; object arrays are refused) and PNG/WebP/JPEG.
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


# Storage dtypes of the array members. numpy has no bfloat16, so a bfloat16 array is stored as the uint16 of its
# bit patterns (the upper half of the float32) and the manifest names the dtype; never pickled.
ARRAY_DTYPES = ("float32", "float16", "bfloat16")
NPY_DTYPE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the array stored for `dtype` (round to nearest even, as torch's casts do)."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float32":
        return arr
    if dtype == "float16":
        with np.errstate(over="ignore"):
            half = arr.astype(np.float16)
        if np.isinf(half).sum() != np.isinf(arr).sum():  # never store a finite value as inf
            raise ValueError(f"a value of magnitude {np.abs(arr[np.isfinite(arr)]).max():.4g} exceeds float16's "
                             f"range (65504): store this array as bfloat16 or float32")
        return half
    if dtype == "bfloat16":
        bits = arr.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(arr), np.uint16(0x7FC0), rounded)  # a NaN stays a (quiet) NaN
    raise ValueError(f"unknown array dtype {dtype!r}; one of {', '.join(ARRAY_DTYPES)}")


def from_storage(arr: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """A stored array -> float32, checking it holds what the manifest's dtype says."""
    if arr.dtype != NPY_DTYPE[dtype]:
        raise ShardError(f"{where}: holds {arr.dtype} but the manifest says {dtype} (stored as "
                         f"{NPY_DTYPE[dtype]}); the shard does not belong to this manifest: re-generate it")
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def image_bytes(img: np.ndarray, ext: str, quality: int = 0) -> bytes:
    """uint8 HWC -> PNG, WebP (lossless at quality 0, else lossy at that quality) or JPEG (quality 1..100)
    bytes, deterministic for a given Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img)
    if ext == "png" and not quality:
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    elif ext == "webp" and not quality:
        im.save(buf, format="WEBP", lossless=True, quality=100, method=4)
    elif ext == "webp":
        im.save(buf, format="WEBP", lossless=False, quality=quality, method=4)
    elif ext == "jpg" and quality:
        im.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        raise ValueError(f"image format {ext!r} with quality {quality} is not one gdro writes")
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
