"""Turn a schema-v2 dataset into the schema-v1 dataset the same configuration wrote before v2 (group JSON with
`metadata` as an object, no `metadata_json` Parquet column, a v1 manifest), to test that v1 is still read."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

V2_MANIFEST_FIELDS = ("embeds_dtype", "image_quality", "images_rescorable")


def _rewrite_tar(path: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(path, "r:") as src, tarfile.open(fileobj=out, mode="w:", format=src.format) as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name.endswith(".json"):
                rec = json.loads(data)
                rec["metadata"] = json.loads(rec.pop("metadata_json"))
                rec["schema_version"] = 1
                data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def as_v1(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for sh in m["shards"]:
        data = _rewrite_tar(dst / sh["tar"])
        (dst / sh["tar"]).write_bytes(data)
        sh["sha256"], sh["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        table = pq.read_table(dst / sh["parquet"]).drop_columns(["metadata_json"])
        pq.write_table(table, dst / sh["parquet"], compression="zstd")
        sh["parquet_sha256"] = hashlib.sha256((dst / sh["parquet"]).read_bytes()).hexdigest()
        sh["parquet_bytes"] = (dst / sh["parquet"]).stat().st_size
    for k in V2_MANIFEST_FIELDS:
        m.pop(k)
    m["schema_version"] = 1
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst
