"""Bad input to stage one: clear errors naming the file, line or shard; nothing already written is lost."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline.errors import GdroError
from pipeline.prompt_files import load_prompts

from .conftest import copy_dataset, make_cfg, run, shard_files


def test_missing_and_empty_prompt_files(tiny_toy_model, tmp_path):
    with pytest.raises(GdroError, match="prompt file .*nope.jsonl does not exist"):
        run(make_cfg(tiny_toy_model, tmp_path / "a", f"rollouts.prompts={tmp_path / 'nope.jsonl'}"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(GdroError, match="holds no prompts"):
        run(make_cfg(tiny_toy_model, tmp_path / "b", f"rollouts.prompts={empty}"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything


def test_a_bad_line_is_named_by_its_number(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a photo of a circle"}\n{"prompt": "a square"\n')
    with pytest.raises(GdroError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(f)
    f.write_text('{"prompt": "a photo of a circle"}\n\n{"text": "no prompt field"}\n')
    with pytest.raises(GdroError, match=r"p.jsonl:3: each line needs a non-empty string field 'prompt'"):
        load_prompts(f)


def test_plain_text_and_ocr_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('a cat\nA sign that says "Hello World"\n')
    recs = load_prompts(f)
    assert [r["prompt"] for r in recs] == ["a cat", 'A sign that says "Hello World"']
    assert recs[1]["ocr_target"] == "Hello World" and recs[1]["tag"] == "ocr" and "ocr_target" not in recs[0]


def test_a_reward_returning_nan_fails_that_row_only(tiny_toy_model, tmp_path, monkeypatch):
    (tmp_path / "nanreward.py").write_text(textwrap.dedent('''
        import numpy as np

        def half_nan():
            def fn(images, prompts, metadata):
                out = np.array([float(i) for i in range(len(images))])
                out[0] = np.nan
                return out, {}
            return fn
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ds"
    run(make_cfg(tiny_toy_model, out, "rollouts.rewards={'nanreward:half_nan': {}, toy_quality: {}}"))
    table = pq.read_table(out / "shards" / "000000.parquet").to_pandas()
    bad = table[table["status"] == "error"]
    assert len(bad) >= 1 and bad["error"].str.contains("nanreward:half_nan: non-finite score").all()
    assert bad["reward_nanreward:half_nan"].isna().all() and bad["reward_toy_quality"].notna().all()
    assert (table["status"] == "ok").sum() == len(table) - len(bad)


def test_verify_names_a_truncated_shard_and_keeps_the_rest(small_dataset, tmp_path):
    ds = copy_dataset(small_dataset, tmp_path / "ds")
    tar = ds / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    before = shard_files(ds)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(ds)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 1
    assert "BAD shard 000001" in r.stdout and "shard 000000" not in r.stdout and "shard 000002" not in r.stdout
    assert "truncated" in r.stdout  # the header scan names it, not only the checksum
    assert shard_files(ds) == before  # verify only reads


def test_rerun_after_truncation_regenerates_only_that_shard(small_dataset, tiny_toy_model, tmp_path):
    ds = copy_dataset(small_dataset, tmp_path / "ds")
    good = shard_files(small_dataset)
    tar = ds / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    untouched = {n: (ds / "shards" / n).stat().st_mtime_ns for n in good if not n.startswith("000001")}
    run(make_cfg(tiny_toy_model, ds))
    data = {n: b for n, b in shard_files(ds).items() if not n.endswith(".stats.json")}  # stats carry timings
    assert data == {n: b for n, b in good.items() if not n.endswith(".stats.json")}
    assert all((ds / "shards" / n).stat().st_mtime_ns == t for n, t in untouched.items())
    assert json.loads((ds / "manifest.json").read_text())["totals"]["shards"] == 3
