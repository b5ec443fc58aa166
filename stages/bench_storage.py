"""Bytes per group of each storage choice (rollouts.latents_dtype / embeds_dtype / image_format / image_quality),
measured by writing one group's tar sample through gdro's own encoders (`schemas/codec.py`) and webdataset's
TarWriter, as `gdro rollouts` does, for the toy world and for SD3.5-M / FLUX shapes (docs/storage.md).

The array members' bytes depend on their shapes and dtypes only. Image bytes depend on content: the toy row
re-encodes a real toy dataset's images; the 512 px rows use 16 crops of a photograph that ships with matplotlib
(no generator's images are available offline), so read them as typical of natural images, not of one model.

    python -m stages.bench_storage [--toy DATASET]
"""
from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np

from schemas import layout
from schemas.codec import image_bytes, json_bytes, npy_bytes, to_storage

# (label, latents and embeddings dtype, image format, quality)
CHOICES = [("float32 + PNG (schema v1's only choice)", "float32", "png", 0),
           ("bfloat16 + PNG", "bfloat16", "png", 0),
           ("bfloat16 + lossless WebP", "bfloat16", "webp", 0),
           ("bfloat16 + WebP q90 preview", "bfloat16", "webp", 90),
           ("bfloat16 + JPEG q90 preview", "bfloat16", "jpeg", 90)]
# world: (G, latents [C, H, W], prompt embeddings [L, D], pooled [P], image px) at each preset's settings
SHAPES = {"SD3.5-M, 512 px, G = 16 (sd35_ocr)": (16, (16, 64, 64), (77 + 128, 4096), (2048,), 512),
          "FLUX.1-dev, 512 px, G = 16 (flux_ocr)": (16, (16, 64, 64), (128, 4096), (768,), 512)}


def sample_bytes(record: dict, arrays: dict[str, np.ndarray], images: list[np.ndarray], dtype: str, fmt: str,
                 quality: int) -> int:
    """The tar bytes of one group sample written with this storage choice."""
    import webdataset as wds

    ext = layout.image_ext(fmt)
    sample = {"__key__": layout.group_key(0), layout.JSON_MEMBER: json_bytes(record)}
    sample.update({name: npy_bytes(to_storage(a, dtype)) for name, a in arrays.items()})
    sample.update({layout.image_member(i, ext): image_bytes(img, ext, quality) for i, img in enumerate(images)})
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
        sink.write(sample)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:") as tf:  # where the last member ends: the end-of-archive blocks and
        last = tf.getmembers()[-1]  # the padding to tarfile's 10 kB records come once per shard, not per group
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def photo_crops(n: int, px: int) -> list[np.ndarray]:
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photo = np.asarray(im.convert("RGB").resize((2 * px, 2 * px), Image.BICUBIC))
    rng = np.random.default_rng(0)
    return [photo[y:y + px, x:x + px].copy() for y, x in rng.integers(0, px, size=(n, 2))]


def synthetic_group(g: int, lat: tuple, emb: tuple, pooled: tuple, px: int) -> tuple[dict, dict, list]:
    rng = np.random.default_rng(0)
    record = {"key": layout.group_key(0), "prompt": "a sign that reads \"gdro\"", "metadata_json": "{}",
              "seeds": [2**62] * g, "rewards": {"ocr": [0.5] * g, "aesthetic": [5.5] * g}, "status": ["ok"] * g,
              "errors": [""] * g, "image_sha256": ["0" * 64] * g, "ref_t": [0.5, 0.5], "ref_noise_seeds": [2**62] * 2,
              "ref_errors": [[0.123456789] * g] * 2, "prompt_id": 0, "schema_version": 2}
    arrays = {layout.LATENTS_MEMBER: rng.standard_normal((g, *lat), np.float32),
              layout.PROMPT_EMBEDS_MEMBER: rng.standard_normal(emb, np.float32),
              layout.POOLED_EMBEDS_MEMBER: rng.standard_normal(pooled, np.float32)}
    return record, arrays, photo_crops(g, px)


def toy_group(root: Path) -> tuple[dict, dict, list]:
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest

    m = load_manifest(root)
    sh = m["shards"][0]
    key, raw = next(iter(iter_tar_groups(root / sh["tar"])))
    rec, decoded = decode_group(key, raw, sh["tar"], array_dtypes(m))
    ext = layout.image_ext(m["image_format"])
    images = [decoded.pop(layout.image_member(i, ext)) for i in range(rec.group_size)]
    return rec.to_json(), decoded, images


def table(worlds: dict[str, tuple]) -> str:
    lines = ["| world | storage | bytes per group | GB per 10k prompts | vs. float32 + PNG |", "|---|---|---|---|---|"]
    for world, (record, arrays, images) in worlds.items():
        base = None
        for label, dtype, fmt, quality in CHOICES:
            n = sample_bytes(record, arrays, images, dtype, fmt, quality)
            base = base or n
            lines.append(f"| {world} | {label} | {n:,} | {n * 1e4 / 1e9:.2f} | {n / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", type=Path, default=None, help="A toy dataset to re-encode (default: none)")
    args = ap.parse_args(argv)
    worlds = {}
    if args.toy:
        worlds["toy world, 32 px, G = 8"] = toy_group(args.toy)
    for world, shapes in SHAPES.items():
        worlds[world] = synthetic_group(*shapes)
    print(table(worlds))


if __name__ == "__main__":
    main()
