"""Teams share datasets on the Hugging Face hub: the `datasets` loader (webdataset builder, streaming and not),
its Parquet builder and duckdb read a gdro dataset, and give the values gdro's own reader gives. Schema v1's
group JSON (GenEval's mixed-type `"position": ["below", 0]` inside an object) is what the loader could not type;
v1 datasets are still read by gdro."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import PROMPTS
from .v1_dataset import as_v1

datasets = pytest.importorskip("datasets")
duckdb = pytest.importorskip("duckdb")


def _gdro_groups(root: Path) -> dict[str, tuple]:
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest

    m = load_manifest(root)
    return {key: decode_group(key, raw, sh["tar"], array_dtypes(m))
            for sh in m["shards"] for key, raw in iter_tar_groups(root / sh["tar"])}


def _tars(root: Path) -> list[str]:
    return [str(p) for p in sorted((root / "shards").glob("*.tar"))]


def _prompt_lines(n: int) -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines()[:n]]


def _check_example(ex: dict, groups: dict, lines: list[dict]) -> None:
    rec, arrays = groups[ex["__key__"]]
    obj = ex["json"]
    assert obj["prompt"] == rec.prompt and obj["seeds"] == rec.seeds and obj["status"] == rec.status
    assert obj["rewards"] == rec.rewards and obj["ref_errors"] == rec.ref_errors and obj["ref_t"] == rec.ref_t
    # the original metadata comes back exactly, compared with the prompt file itself
    assert json.loads(obj["metadata_json"]) == rec.metadata == lines[rec.prompt_id]
    for name in ("latents.npy", "prompt_embeds.npy", "pooled_embeds.npy"):
        np.testing.assert_array_equal(np.asarray(ex[name], dtype=np.float32), arrays[name])
    for i in range(rec.group_size):
        np.testing.assert_array_equal(np.asarray(ex[f"{i}.png"].convert("RGB")), arrays[f"{i}.png"])


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_webdataset_loader_gives_gdro_values(small_dataset, tmp_path, streaming):
    groups = _gdro_groups(small_dataset)
    lines = _prompt_lines(6)
    assert any("position" in obj for ln in lines for obj in ln["include"])  # the mixed-type list is in there
    ds = datasets.load_dataset("webdataset", data_files={"train": _tars(small_dataset)}, split="train",
                               streaming=streaming, cache_dir=str(tmp_path / "hf"))
    seen = []
    for ex in ds:
        _check_example(ex, groups, lines)
        seen.append(ex["__key__"])
    assert seen == sorted(groups)


def test_hf_parquet_loader_and_duckdb_give_gdro_values(small_dataset, tmp_path):
    from pipeline.dataset_summary import read_rows

    _, df = read_rows(small_dataset)
    groups = _gdro_groups(small_dataset)
    files = [str(p) for p in sorted((small_dataset / "shards").glob("*.parquet"))]
    hf = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf")).to_pandas()
    glob = str(small_dataset / "shards" / "*.parquet")
    db = duckdb.sql(f"SELECT *, json_extract_string(metadata_json, '$.tag') AS meta_tag FROM read_parquet('{glob}') "
                    f"ORDER BY prompt_id, member").df()
    assert len(hf) == len(db) == len(df) == 6 * 3
    for frame in (hf, db):
        for col in df.columns:
            assert list(frame[col]) == list(df[col]), col
    assert list(db["meta_tag"]) == list(df["tag"])
    for _, row in db.iterrows():  # and the rows agree with the tars
        rec, _ = groups[row["key"]]
        assert row["reward_toy_geneval"] == rec.rewards["toy_geneval"][row["member"]]
        assert json.loads(row["metadata_json"]) == rec.metadata
    per_kind = duckdb.sql(f"SELECT tag, avg(reward_toy_quality) AS q FROM read_parquet('{glob}') GROUP BY tag "
                          f"ORDER BY tag").fetchall()
    assert [(t, pytest.approx(q)) for t, q in per_kind] == [
        (t, pytest.approx(float(df[df["tag"] == t]["reward_toy_quality"].mean()))) for t in sorted(set(df["tag"]))]


def test_v1_json_defeats_the_hf_loader_and_gdro_still_reads_v1(small_dataset, tmp_path):
    """What schema v2 fixes (the v1 record does not load), and v1 read back to the same values by gdro."""
    from schemas.manifest import verify_dataset

    v1 = as_v1(small_dataset, tmp_path / "v1")
    with pytest.raises(Exception) as info:
        datasets.load_dataset("webdataset", data_files={"train": _tars(v1)}, split="train",
                              cache_dir=str(tmp_path / "hf"))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    # which one depends on the `datasets` version: an ArrowTypeError or a failed cast of the metadata struct
    assert any(w in c for c in chain for w in ("Arrow", "Expected bytes", "cast")), chain
    assert verify_dataset(v1) == []
    old, new = _gdro_groups(v1), _gdro_groups(small_dataset)
    assert old.keys() == new.keys()
    for key in new:
        assert old[key][0].metadata == new[key][0].metadata and old[key][0].rewards == new[key][0].rewards
        assert old[key][0].schema_version == 1
        for name, arr in new[key][1].items():
            np.testing.assert_array_equal(old[key][1][name], arr)
    from pipeline.train_data import check_datasets, group_batches  # and the trainer takes v1 as it is

    check_datasets(v1, {"toy_geneval": 1.0}, verify=True)
    kw = {"groups": 3, "weights": {"toy_geneval": 1.0}, "seed": 0, "rank": 0, "world": 1, "workers": 0,
          "shuffle_buffer": 1, "order": "sequential"}
    a, b = next(iter(group_batches(v1, **kw)[1])), next(iter(group_batches(small_dataset, **kw)[1]))
    assert a["keys"] == b["keys"] and all(bool((a[k] == b[k]).all()) for k in ("latents", "rewards", "ref_errors"))


def test_the_card_shows_the_snippets(small_dataset):
    card = (small_dataset / "README.md").read_text()
    assert 'load_dataset("webdataset"' in card and "duckdb" in card and "metadata_json" in card
