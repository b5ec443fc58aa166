"""The one writer of a finished shard: tar (sorted members, fixed mtime: the same groups give the same bytes) and
Parquet under temporary names, renamed, then the stats file last (the completion marker). `gdro rollouts` and
`gdro rescore` both write through it."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

from schemas import layout
from schemas.records import GroupRecord, ShardStats, parquet_rows, parquet_schema, reward_mean, sha256_bytes

TAR_MTIME = 0  # fixed member mtime: the same config gives byte-identical tars


def write_shard(root: Path, index: int, records: list[GroupRecord], samples: list[dict], reward_names: list[str], *,
                fingerprint: str, task_id: int, t0: float, timings: dict, mark: float) -> ShardStats:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    paths = layout.shard_paths(root, index)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME) as sink:
        for s in samples:
            sink.write(s)
    tar_data = buf.getvalue()
    table = pa.table(parquet_rows(records, reward_names), schema=parquet_schema(reward_names))
    pbuf = pa.BufferOutputStream()
    pq.write_table(table, pbuf, compression="zstd")
    parquet_data = pbuf.getvalue().to_pybytes()
    layout.atomic_write(paths["tar"], tar_data)
    layout.atomic_write(paths["parquet"], parquet_data)
    failed = sum(st != "ok" for rec in records for st in rec.status)
    timings["writing"] = time.time() - mark  # encoding the images and groups, tar, parquet
    stats = ShardStats(
        shard=layout.shard_name(index), groups=len(records), images=sum(rec.group_size for rec in records),
        failed_images=failed,
        reward_means={n: reward_mean([v for rec in records for v in rec.rewards[n]]) for n in reward_names},
        tar_sha256=sha256_bytes(tar_data), tar_bytes=len(tar_data), parquet_sha256=sha256_bytes(parquet_data),
        parquet_bytes=len(parquet_data), fingerprint=fingerprint, seconds=round(time.time() - t0, 3),
        task_id=task_id, timings={k: round(v, 3) for k, v in timings.items()})
    layout.atomic_write(paths["stats"], (json.dumps(stats.__dict__, indent=1) + "\n").encode())  # last
    return stats
