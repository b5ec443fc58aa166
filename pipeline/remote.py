"""Datasets at a URL: `http(s)://` (curl) and `gs://` (gsutil) through webdataset's `gopen`, `s3://` through
webdataset's `Pipe` running `aws s3 cp URL -` (an argument list, no shell). Every shard is read whole into
memory, its sha256 compared with the manifest's, and its tar headers scanned (`schemas/scan.py`) before any of
its groups is used: a tampered or hostile remote shard stops the reader with the shard named.

`gdro train` streams shards this way; `gdro verify`, `inspect` and `rescore` first `mirror` the dataset into a
local folder (every file checked as it arrives) and then work on that folder.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlparse

from schemas import layout
from schemas.codec import ShardError
from schemas.manifest import with_v1_defaults
from schemas.records import sha256_bytes
from schemas.scan import scan_tar

SCHEMES = ("http", "https", "gs", "s3")


def is_url(location: str | Path) -> bool:
    return urlparse(str(location)).scheme in SCHEMES


def join(base: str, rel: str) -> str:
    return f"{str(base).rstrip('/')}/{rel}"


def read_url(url: str) -> bytes:
    from webdataset.gopen import Pipe, gopen

    try:
        if urlparse(url).scheme == "s3":
            stream = Pipe(["aws", "s3", "cp", url, "-"], mode="rb", ignore_status=[141])
        else:
            stream = gopen(url, "rb")
        with stream:
            return stream.read()
    except Exception as e:  # noqa: BLE001  curl, gsutil or aws failing: name the URL, keep the cause short
        raise ShardError(f"{url}: cannot be fetched ({type(e).__name__}: {e}); check the URL and the network") \
            from None


def load_manifest_url(base: str) -> tuple[dict, bytes]:
    url = join(base, layout.MANIFEST)
    data = read_url(url)
    try:
        return with_v1_defaults(json.loads(data), url), data
    except json.JSONDecodeError as e:
        raise ShardError(f"{url}: not valid JSON ({e}); is this a gdro dataset?") from None


def fetch_checked(base: str, rel: str, sha256: str, shard: str) -> bytes:
    url = join(base, rel)
    data = read_url(url)
    if sha256_bytes(data) != sha256:
        raise ShardError(f"shard {shard}: {url} sha256 differs from the manifest's (tampered or corrupt in transit); "
                         f"stopped before using it: fetch it again or ask the publisher")
    return data


def fetch_shard(base: str, sh: dict, m: dict) -> bytes:
    """A shard's tar, whole, checked against the manifest's sha256 and scanned."""
    data = fetch_checked(base, sh["tar"], sh["sha256"], sh["name"])
    problem = scan_tar(io.BytesIO(data), sh, m)
    if problem:
        raise ShardError(f"{join(base, '')}: {problem}")
    return data


def mirror(base: str, folder: Path) -> Path:
    """Copy the dataset at `base` into `folder`, each file checked against the manifest as it arrives (a file
    already there with the right sha256 is kept, so an interrupted mirror resumes); manifest last."""
    from schemas.records import sha256_file

    m, manifest_bytes = load_manifest_url(base)
    folder = Path(folder)
    for sh in m["shards"]:
        for rel, digest in ((sh["tar"], sh["sha256"]), (sh["parquet"], sh["parquet_sha256"])):
            local = folder / rel
            if not (local.is_file() and sha256_file(local) == digest):
                layout.atomic_write(local, fetch_checked(base, rel, digest, sh["name"]))
    layout.atomic_write(folder / layout.MANIFEST, manifest_bytes)
    return folder
