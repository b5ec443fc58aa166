"""A hostile dataset (a pickle member, an object-dtype .npy) whose publisher recomputed the manifest checksums, and
a damaged one (a truncated tar): `gdro train`, `gdro verify` and `gdro inspect` refuse or name them before
anything is decoded or trained, each with one line naming shard, key and member; no traceback anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gdro_testing import run_train

from .conftest import PROMPTS, copy_dataset
from .test_readers import _evil_group, _replace_tar_in_manifest, _tar_bytes

MEMBER = {"pkl": "evil.pkl", "npy": "latents.npy"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WDS_SECURE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.fixture(params=["pkl", "npy"])
def hostile(request, small_dataset, tmp_path):
    target = tmp_path / "pwned"
    root = copy_dataset(small_dataset, tmp_path / "ds")
    _replace_tar_in_manifest(root, 0, _tar_bytes(_evil_group(small_dataset, target, request.param)))
    return root, target, MEMBER[request.param]


def _names_it(text: str, member: str) -> bool:
    return all(s in text for s in ("shard 000000", "key 000000001", repr(member), "clean copy"))


def test_train_refuses_a_hostile_dataset_before_step_one(hostile, tiny_toy_model, tmp_path):
    from pipeline.config import ExperimentConfig, resolve
    from pipeline.errors import GdroError

    root, target, member = hostile
    out = tmp_path / "run"
    cfg = resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={tiny_toy_model}", f"rollouts.prompts={PROMPTS}", f"train.dataset={root}", f"train.out={out}",
        "train.steps=3", "train.groups_per_step=2"])
    with pytest.raises(GdroError) as info:
        run_train(cfg)
    assert _names_it(str(info.value), member) and "\n" not in str(info.value), info.value
    assert not out.exists()  # nothing written, no step run
    assert not target.exists()  # nothing unpickled


def test_verify_refuses_a_hostile_dataset_in_one_line_per_shard(hostile):
    root, target, member = hostile
    r = _cli("verify", str(root))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    bad = [line for line in r.stdout.splitlines() if line.startswith("BAD")]
    assert any(_names_it(line, member) for line in bad), r.stdout
    assert all("shard 000000" in line for line in bad), r.stdout
    assert not target.exists()


def test_inspect_refuses_a_hostile_dataset_in_one_line(hostile):
    root, target, member = hostile
    r = _cli("inspect", str(root))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdro: error:") and _names_it(lines[0], member), r.stderr
    assert not (root / "contact_sheet.png").exists()
    assert not target.exists()


def test_inspect_names_a_truncated_shard_and_reports_the_rest(small_dataset, tmp_path):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    tar = root / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    r = _cli("inspect", str(root))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    damaged = [line for line in r.stdout.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and "shard 000001" in damaged[0] and "truncated" in damaged[0], r.stdout
    assert "2 sound shards of 3" in r.stdout and "toy_geneval" in r.stdout


def test_the_header_scan_reads_only_npy_headers(small_dataset, monkeypatch):
    """Cheap by construction: of the member data, only the .npy headers are read (a few hundred bytes each)."""
    import tarfile

    from schemas.manifest import load_manifest
    from schemas.scan import scan_dataset

    reads: dict[str, int] = {}
    extract = tarfile.TarFile.extractfile

    def counting(self, info):
        f = extract(self, info)
        read = f.read

        def counted(*a):
            data = read(*a)
            reads[info.name] = reads.get(info.name, 0) + len(data)
            return data

        f.read = counted
        return f

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    assert scan_dataset(small_dataset, load_manifest(small_dataset)) == []
    assert reads and all(name.endswith(".npy") for name in reads), sorted(reads)
    assert max(reads.values()) <= 256 and len(reads) == 6 * 3


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_damaged_manifest_is_one_line_not_a_traceback(small_dataset, tmp_path, command):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    (root / "manifest.json").write_text('{"schema_version": 2, "shards": [')
    r = _cli(command, str(root))
    assert r.returncode in (1, 2) and "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "manifest.json" in r.stdout + r.stderr and "not valid JSON" in r.stdout + r.stderr


def test_a_manifest_naming_other_members_is_refused(small_dataset, tmp_path):
    """The whitelist is the schema's for G and the image format, never the manifest's own list."""
    from pipeline.errors import GdroError
    from pipeline.train_data import check_dataset

    root = copy_dataset(small_dataset, tmp_path / "ds")
    m = json.loads((root / "manifest.json").read_text())
    m["member_names"] = sorted([*m["member_names"], "evil.pkl"])
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GdroError, match="member_names .* is not the schema's"):
        check_dataset(Path(root), {"toy_geneval": 1.0}, verify=False)
