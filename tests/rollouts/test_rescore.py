"""`gdro rescore`: a reward added to a finished dataset from its stored images, into a new revision with its
lineage; the parent untouched; `gdro train` uses the new reward at once; a SIGKILL and a restart give the bytes
of an uninterrupted rescore."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gdro_testing import tar_groups
from PIL import Image

from .conftest import PROMPTS, copy_dataset, make_cfg, run, shard_files

REWARD = "gdro_rescore_reward:mean_red"
SLOW = "gdro_rescore_reward:slow_mean_red"
MODULE = '''
import time

import numpy as np


def mean_red():
    def fn(images, prompts, metadata):
        return np.asarray(images, dtype=np.float64)[..., 0].mean(axis=(1, 2)) / 255.0, {}

    return fn


def slow_mean_red():
    inner = mean_red()

    def fn(images, prompts, metadata):
        time.sleep(0.4)
        return inner(images, prompts, metadata)

    return fn
'''


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rescore_mod")
    (folder / "gdro_rescore_reward.py").write_text(MODULE)
    return folder


@pytest.fixture
def scorer(scorer_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(scorer_dir))
    return scorer_dir


def _rescore(dataset, out, reward=REWARD):
    from stages.rescore import main

    return main(Path(dataset), reward, Path(out))


def test_rescore_adds_the_reward_from_the_stored_images(small_dataset, tmp_path, scorer):
    from schemas.manifest import verify_dataset

    before = {n: (b, (small_dataset / "shards" / n).stat().st_mtime_ns) for n, b in shard_files(small_dataset).items()}
    parent_manifest = (small_dataset / "manifest.json").read_bytes()
    out = _rescore(small_dataset, tmp_path / "rescored")
    assert verify_dataset(out) == []
    assert {n: (b, (small_dataset / "shards" / n).stat().st_mtime_ns)
            for n, b in shard_files(small_dataset).items()} == before  # the parent is only read
    assert (small_dataset / "manifest.json").read_bytes() == parent_manifest
    m = json.loads((out / "manifest.json").read_text())
    parent = json.loads(parent_manifest)
    assert [r["name"] for r in m["rewards"]] == [*(r["name"] for r in parent["rewards"]), REWARD]
    step = m["lineage"][-1]
    assert step["parent_manifest_sha256"] == hashlib.sha256(parent_manifest).hexdigest()
    assert step["reward_added"]["name"] == REWARD and step["parent_fingerprint"] == parent["fingerprint"]
    assert m["fingerprint"] != parent["fingerprint"] and "rescored" in (out / "README.md").read_text()
    import pyarrow.parquet as pq

    for sh in m["shards"]:
        old, new = tar_groups(small_dataset / sh["tar"]), tar_groups(out / sh["tar"])
        assert old.keys() == new.keys()
        table = pq.read_table(out / sh["parquet"]).to_pandas()
        for key in old:
            assert {k: v for k, v in new[key].items() if k != "json"} == \
                {k: v for k, v in old[key].items() if k != "json"}  # every other member byte for byte
            rec_old, rec_new = json.loads(old[key]["json"]), json.loads(new[key]["json"])
            want = [np.asarray(Image.open(io.BytesIO(old[key][f"{i}.png"])).convert("RGB"), np.float64)[..., 0].mean()
                    / 255.0 for i in range(3)]  # computed here, from the parent's PNG bytes
            assert rec_new["rewards"][REWARD] == pytest.approx(want, abs=0)
            assert {k: v for k, v in rec_new["rewards"].items() if k != REWARD} == rec_old["rewards"]
            rows = table[table["key"] == key].sort_values("member")
            assert list(rows[f"reward_{REWARD}"]) == rec_new["rewards"][REWARD]
            assert list(rows["reward_toy_geneval"]) == rec_old["rewards"]["toy_geneval"]


def test_rescore_refuses_what_it_cannot_do(small_dataset, tiny_toy_model, tmp_path, scorer):
    from pipeline.errors import GdroError

    with pytest.raises(GdroError, match="already stores it"):
        _rescore(small_dataset, tmp_path / "a", "toy_geneval")
    with pytest.raises(GdroError, match="never in place"):
        _rescore(small_dataset, small_dataset)
    with pytest.raises(GdroError, match="YAML mapping"):
        _rescore(small_dataset, tmp_path / "b", f"{REWARD}=[1, 2]")
    lossy = run(make_cfg(tiny_toy_model, tmp_path / "lossy", "rollouts.num_prompts=2", "rollouts.image_format=jpeg",
                         "rollouts.image_quality=85"))
    with pytest.raises(GdroError, match="lossy image previews .* not faithful enough"):
        _rescore(lossy, tmp_path / "c")
    damaged = copy_dataset(small_dataset, tmp_path / "damaged")
    tar = damaged / "shards" / "000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(GdroError, match="cannot be rescored: shard 000002"):
        _rescore(damaged, tmp_path / "d")
    for name in "abcd":
        assert not (tmp_path / name / "shards").exists()


def test_train_uses_the_new_reward_at_once(small_dataset, tiny_toy_model, tmp_path, scorer):
    from gdro_testing import run_train

    from pipeline.config import ExperimentConfig, resolve
    from pipeline.train_data import group_batches

    out = _rescore(small_dataset, tmp_path / "rescored")
    _, batches = group_batches(out, groups=2, weights={REWARD: 1.0}, seed=0, rank=0, world=1, workers=0,
                               shuffle_buffer=1, order="sequential")
    batch = next(iter(batches))
    for j, key in enumerate(batch["keys"]):
        rec = json.loads(tar_groups(out / "shards" / "000000.tar")[key]["json"])
        assert batch["rewards"][j].tolist() == rec["rewards"][REWARD]
    run = tmp_path / "run"
    cfg = resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={tiny_toy_model}", f"rollouts.prompts={PROMPTS}", f"train.dataset={out}", f"train.out={run}",
        f'train.reward_weights={{"{REWARD}": 1.0}}', "train.steps=2", "train.groups_per_step=2",
        "train.save_every=2", "train.data_order=sequential"])
    run_train(cfg)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(np.isfinite(json.loads(x)["loss"]) for x in lines)
    assert json.loads(lines[0])["reward_mean"] == pytest.approx(float(batch["rewards"].mean()))


def test_a_killed_rescore_restarts_to_the_same_bytes(small_dataset, tmp_path, scorer, scorer_dir):
    clean = _rescore(small_dataset, tmp_path / "clean", SLOW)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WDS_SECURE": "1",
           "PYTHONPATH": os.pathsep.join([str(scorer_dir), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "pipeline.cli", "rescore", str(small_dataset), "--reward", SLOW, "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (out / "shards" / "000000.stats.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    time.sleep(0.5)  # into the second shard's scoring
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # killed before the end
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "1 shards already done" in r.stdout or "2 shards already done" in r.stdout, r.stdout

    def data(root):
        return {n: b for n, b in shard_files(root).items() if not n.endswith(".stats.json")}  # stats carry timings

    assert data(out) == data(clean)
    m_out, m_clean = (json.loads((p / "manifest.json").read_text()) for p in (out, clean))
    assert m_out["shards"] == m_clean["shards"] and m_out["fingerprint"] == m_clean["fingerprint"]
