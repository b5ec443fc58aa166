"""Anyone can read a dataset without gdro (tarfile + numpy + PIL, webdataset, pyarrow, pandas); pickle is
refused everywhere; `gdro verify` names the bad shard."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from .conftest import copy_dataset

G = 3
MEMBERS = sorted(["json", "latents.npy", "prompt_embeds.npy", "pooled_embeds.npy", "0.png", "1.png", "2.png"])


def _plain_groups(tar_path):
    """{key: {member: bytes}} with the standard library only."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for info in tf:
            assert info.isfile(), info.name
            key, _, member = info.name.partition(".")
            groups.setdefault(key, {})[member] = tf.extractfile(info).read()
    return groups


def test_shards_read_with_tarfile_numpy_and_pil(small_dataset):
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    seen_keys = []
    for sh in manifest["shards"]:
        groups = _plain_groups(small_dataset / sh["tar"])
        assert len(groups) == sh["groups"] == 2
        for key, raw in groups.items():
            assert key.isdigit(), key
            assert sorted(raw) == MEMBERS, f"{key}: {sorted(raw)}"
            rec = json.loads(raw["json"])
            lat = np.load(io.BytesIO(raw["latents.npy"]), allow_pickle=False)
            pe = np.load(io.BytesIO(raw["prompt_embeds.npy"]), allow_pickle=False)
            pooled = np.load(io.BytesIO(raw["pooled_embeds.npy"]), allow_pickle=False)
            assert lat.shape == (G, 3, 32, 32) and lat.dtype == np.float32
            assert pe.ndim == 2 and pe.dtype == np.float32 and pooled.ndim == 1 and pooled.dtype == np.float32
            assert np.isfinite(lat).all()
            assert int(key) == rec["prompt_id"] and rec["key"] == key and len(rec["seeds"]) == G
            assert rec["status"] == ["ok"] * G and rec["schema_version"] == 2
            for m in range(G):
                png = raw[f"{m}.png"]
                assert hashlib.sha256(png).hexdigest() == rec["image_sha256"][m]
                img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                assert img.shape == (32, 32, 3)
                # the toy model's latents are pixels in [-1, 1]: the PNG is exactly their rendering
                expect = np.clip((lat[m] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
                np.testing.assert_array_equal(img, expect)
            seen_keys.append(key)
    assert seen_keys == [f"{i:09d}" for i in range(6)]


def test_tars_are_reproducible_archives(small_dataset):
    with tarfile.open(small_dataset / "shards" / "000000.tar") as tf:
        infos = tf.getmembers()
    names = [i.name for i in infos]
    assert names == sorted(names)
    assert {i.mtime for i in infos} == {0}


def test_webdataset_reads_the_shards_securely(small_dataset, monkeypatch):
    import webdataset as wds
    import webdataset.utils

    assert os.environ.get("WDS_SECURE") == "1"
    monkeypatch.setattr(webdataset.utils, "enforce_security", True)
    urls = [str(p) for p in sorted((small_dataset / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    fields = {tuple(sorted(k for k in s if not k.startswith("__"))) for s in samples}
    assert fields == {tuple(MEMBERS)}
    for s in samples:
        assert s["latents.npy"].shape == (G, 3, 32, 32)
        assert s["0.png"].shape == (32, 32, 3) and s["0.png"].dtype == np.uint8
        assert s["json"]["prompt_id"] == int(s["__key__"])


def test_parquet_reads_with_pyarrow_and_pandas(small_dataset):
    import pandas as pd

    manifest = json.loads((small_dataset / "manifest.json").read_text())
    rows = []
    for sh in manifest["shards"]:
        table = pq.read_table(small_dataset / sh["parquet"])
        assert table.num_rows == sh["images"] == 2 * G
        for col in ("key", "group", "member", "prompt_id", "prompt", "seed", "reward_toy_geneval",
                    "reward_toy_quality", "status", "error", "image_sha256"):
            assert col in table.column_names, col
        df = pd.read_parquet(small_dataset / sh["parquet"])
        assert df.equals(table.to_pandas())
        groups = _plain_groups(small_dataset / sh["tar"])
        for _, row in df.iterrows():
            rec = json.loads(groups[row["key"]]["json"])
            m = row["member"]
            assert row["prompt_id"] == rec["prompt_id"] and row["prompt"] == rec["prompt"]
            assert row["seed"] == rec["seeds"][m]
            assert row["image_sha256"] == rec["image_sha256"][m]
            assert row["status"] == "ok" and row["error"] == ""
            for name in ("toy_geneval", "toy_quality"):
                assert row[f"reward_{name}"] == rec["rewards"][name][m]
        rows.append(df)
    df = pd.concat(rows)
    assert len(df) == 6 * G
    assert sorted(zip(df["prompt_id"], df["member"])) == [(p, m) for p in range(6) for m in range(G)]


# ------------------------------------------------------------------------------------------------ pickle
class _Payload:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _live_payload(path: Path) -> bytes:
    data = pickle.dumps(_Payload(path))
    probe = path.with_name(path.name + ".probe")  # prove the payload really acts when unpickled
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()
    probe.unlink()
    return data


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tf:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _replace_tar_in_manifest(root: Path, shard: int, data: bytes) -> None:
    """Swap a shard's tar and update the manifest's checksum, so only the content checks can catch it."""
    (root / "shards" / f"{shard:06d}.tar").write_bytes(data)
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][shard]["sha256"] = hashlib.sha256(data).hexdigest()
    m["shards"][shard]["bytes"] = len(data)
    mpath.write_text(json.dumps(m))


def _evil_group(small_dataset: Path, target: Path, how: str) -> dict[str, bytes]:
    """Group 000000001 of shard 0 with a pickle smuggled in: an extra .pkl member, or an object-array .npy."""
    members = {f"{k}.{m}": v for k, raw in _plain_groups(small_dataset / "shards" / "000000.tar").items()
               for m, v in raw.items()}
    payload = _live_payload(target)
    if how == "pkl":
        members["000000001.evil.pkl"] = payload
    else:
        buf = io.BytesIO()
        np.save(buf, np.array([_Payload(target)], dtype=object), allow_pickle=True)
        members["000000001.latents.npy"] = buf.getvalue()
    return members


@pytest.mark.parametrize("how", ["pkl", "npy"])
def test_our_reader_refuses_pickle(small_dataset, tmp_path, how):
    from schemas.codec import ShardError
    from schemas.manifest import decode_group, iter_tar_groups, verify_dataset

    target = tmp_path / "pwned"
    root = copy_dataset(small_dataset, tmp_path / "ds")
    _replace_tar_in_manifest(root, 0, _tar_bytes(_evil_group(small_dataset, target, how)))

    tar = root / "shards" / "000000.tar"
    refused = 0
    for key, raw in iter_tar_groups(tar):
        if key == "000000001":
            with pytest.raises(ShardError, match="evil.pkl" if how == "pkl" else "latents.npy"):
                decode_group(key, raw, str(tar))
            refused += 1
        else:
            decode_group(key, raw, str(tar))
    assert refused == 1
    problems = verify_dataset(root)
    assert problems and all("shard 000000" in p for p in problems), problems
    assert any("000000001" in p for p in problems)
    assert not target.exists()


@pytest.mark.parametrize("how", ["pkl", "npy"])
def test_webdataset_secure_refuses_pickle(small_dataset, tmp_path, monkeypatch, how):
    import webdataset as wds
    import webdataset.utils

    monkeypatch.setattr(webdataset.utils, "enforce_security", True)
    target = tmp_path / "pwned"
    tar = tmp_path / "evil.tar"
    tar.write_bytes(_tar_bytes(_evil_group(small_dataset, target, how)))
    with pytest.raises(Exception) as info:
        list(wds.WebDataset(str(tar), shardshuffle=False).decode("rgb8"))
    chain, exc = [], info.value
    while exc is not None:  # webdataset wraps the refusal in a DecodingError
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__
    assert re.search("not allowed for security|allow_pickle=False", " | ".join(chain)), chain
    assert not target.exists()


# ------------------------------------------------------------------------------------------------ gdro verify
def _verify(root: Path):
    env = {**os.environ, "WDS_SECURE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(root)], capture_output=True, text=True,
                       env=env, timeout=120, check=False)
    return p.returncode, p.stdout + p.stderr


def test_verify_accepts_a_sound_dataset(small_dataset):
    rc, out = _verify(small_dataset)
    assert rc == 0, out
    assert "OK" in out and "BAD" not in out


def test_verify_names_the_shard_with_a_flipped_byte(small_dataset, tmp_path):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    tar = root / "shards" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01
    tar.write_bytes(bytes(data))
    rc, out = _verify(root)
    assert rc != 0
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad and all("shard 000001" in line for line in bad), out
    assert "sha256" in out


def test_verify_names_the_shard_with_a_missing_parquet(small_dataset, tmp_path):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    (root / "shards" / "000002.parquet").unlink()
    rc, out = _verify(root)
    assert rc != 0
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad and all("shard 000002" in line for line in bad), out
    assert "000002.parquet" in out and "missing" in out


def test_verify_refuses_another_schema_version(small_dataset, tmp_path):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    mpath = root / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    rc, out = _verify(root)
    assert rc != 0
    assert "schema_version" in out and "manifest.json" in out, out
