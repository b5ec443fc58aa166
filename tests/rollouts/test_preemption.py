"""SIGKILL a real `gdro rollouts` process at several moments: no final name ever holds a partial file, and the
restarted job produces exactly the bytes of an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import PROMPTS, shard_files

# Enough work that a kill lands mid-run: 10 shards of 6 prompts x G=6, 6 sampler steps.
WORK = ("rollouts.num_prompts=60", "rollouts.prompts_per_shard=6", "rollouts.group_size=6", "sampler.steps=6",
        "rollouts.batch_size=12", "rollouts.ref_cache_k=1")
N_SHARDS, PPS, G = 10, 6, 6
FINAL = re.compile(r"^\d{6}\.(tar|parquet|stats\.json)$")


def _overrides(model, out):
    return [f"model.path={model}", f"rollouts.out={out}", f"rollouts.prompts={PROMPTS}", *WORK]


def _start(model, out, log):
    args = [sys.executable, "-m", "pipeline.cli", "rollouts"]
    for o in _overrides(model, out):
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WDS_SECURE": "1"}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stats(root):
    """Finished shards' stats files (pathlib's * also matches the .tmp- ones: leave those out)."""
    if not (root / "shards").is_dir():
        return []
    return sorted(p for p in (root / "shards").glob("*.stats.json") if FINAL.match(p.name))


def _kill_when(proc, condition, timeout=120.0) -> bool:
    """Poll `condition` every ~2 ms; SIGKILL the process when it holds. True if the process was still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            break
        time.sleep(0.002)
    alive = proc.poll() is None
    proc.kill()  # SIGKILL: no cleanup handler runs
    proc.wait(timeout=30)
    return alive


def _ended(moment, proc, tmp_path) -> str:
    log = (tmp_path / "log.txt").read_text(errors="replace")[-3000:]
    return f"{moment}: the job ended (exit code {proc.returncode}) before it could be killed; its log:\n{log}"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_no_partial_final_file(root: Path, moment: str) -> dict:
    """Everything under a final name is whole; return what the kill left (for the record)."""
    left = {"stats": 0, "tar_without_stats": 0, "tmp": 0}
    for name in ("rollouts_config.json", "manifest.json"):
        if (root / name).exists():
            json.loads((root / name).read_text())  # complete JSON
    shards = root / "shards"
    if not shards.is_dir():
        return left
    for p in sorted(shards.iterdir()):
        if p.name.startswith(".tmp-"):
            left["tmp"] += 1
            continue
        assert FINAL.match(p.name), f"{moment}: unexpected file {p.name}"
        index = int(p.name[:6])
        n_groups = min(PPS, 60 - index * PPS)
        if p.name.endswith(".stats.json"):
            st = json.loads(p.read_text())
            tar, parquet = shards / f"{p.name[:6]}.tar", shards / f"{p.name[:6]}.parquet"
            assert tar.exists() and parquet.exists(), f"{moment}: {p.name} without its tar/parquet"
            assert _sha(tar) == st["tar_sha256"] and tar.stat().st_size == st["tar_bytes"], f"{moment}: {tar.name}"
            assert _sha(parquet) == st["parquet_sha256"], f"{moment}: {parquet.name}"
            left["stats"] += 1
        elif p.suffix == ".tar":
            with tarfile.open(p) as tf:  # a whole archive with every group of the shard
                keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
                assert all(tf.extractfile(m).read() is not None for m in tf.getmembers())
            assert len(keys) == n_groups, f"{moment}: {p.name} holds {len(keys)} groups"
            if not (shards / f"{p.name[:6]}.stats.json").exists():
                left["tar_without_stats"] += 1
        else:
            assert pq.read_table(p).num_rows == n_groups * G, f"{moment}: {p.name}"
    if (root / "manifest.json").exists():
        assert len(_stats(root)) == N_SHARDS
    return left


@pytest.mark.slow
def test_sigkill_at_any_moment_then_restart_gives_identical_bytes(tiny_toy_model, tmp_path):
    from pipeline.config import ExperimentConfig, resolve

    from .conftest import run

    root = tmp_path / "killed"
    rng = random.Random()
    delay = rng.uniform(0.0, 1.5)
    moments = []
    with open(tmp_path / "log.txt", "ab") as log:
        # 1. a random moment soon after the job has set up its folder (model loading or early shards)
        proc = _start(tiny_toy_model, root, log)
        t_seen = []

        def random_moment():
            if not t_seen and (root / "rollouts_config.json").exists():
                t_seen.append(time.monotonic())
            return bool(t_seen) and time.monotonic() - t_seen[0] >= delay

        assert _kill_when(proc, random_moment), _ended("kill 1", proc, tmp_path)
        moments.append((f"random, {delay:.2f}s after setup", _check_no_partial_final_file(root, "kill 1")))

        # 2. right after a (new) shard is finished
        proc = _start(tiny_toy_model, root, log)
        n0 = len(_stats(root))
        assert _kill_when(proc, lambda: len(_stats(root)) > n0), _ended("kill 2", proc, tmp_path)
        left = _check_no_partial_final_file(root, "kill 2")
        assert left["stats"] > n0
        moments.append(("after a stats file appeared", left))

        # 3. mid-write: as soon as a temporary file or a tar without its stats shows up
        proc = _start(tiny_toy_model, root, log)
        n0 = len(_stats(root))

        def mid_write():
            sh = root / "shards"
            names = {p.name for p in sh.iterdir()} if sh.is_dir() else set()
            if any(n.startswith(".tmp-") for n in names):
                return True
            if any(n.endswith(".tar") and n[:6] + ".stats.json" not in names for n in names):
                return True
            return len(_stats(root)) >= n0 + 2  # fallback: do not let it finish

        assert _kill_when(proc, mid_write), _ended("kill 3", proc, tmp_path)
        moments.append(("mid-write", _check_no_partial_final_file(root, "kill 3")))
    print("kill moments and what they left:", moments)
    assert len(_stats(root)) < N_SHARDS, "nothing was left to do after the kills"

    # restart to completion (same code path as the CLI, in-process), then an uninterrupted run to compare
    def cfg(out):
        return resolve(ExperimentConfig, preset="toy", overrides=_overrides(tiny_toy_model, out))

    run(cfg(root))
    assert _check_no_partial_final_file(root, "after restart") == {"stats": N_SHARDS, "tar_without_stats": 0,
                                                                    "tmp": 0}
    clean = run(cfg(tmp_path / "clean"))
    got, want = shard_files(root), shard_files(clean)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith((".tar", ".parquet")):
            assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    m_got = json.loads((root / "manifest.json").read_text())
    m_want = json.loads((clean / "manifest.json").read_text())
    assert m_got["shards"] == m_want["shards"] and m_got["fingerprint"] == m_want["fingerprint"]
