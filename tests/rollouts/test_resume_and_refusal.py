"""Restart skips finished shards and redoes unfinished ones identically; a changed config or too many tasks is
refused with a message that says why."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import GdroError
from stages import rollouts

from .conftest import copy_dataset, make_cfg, run, shard_files


@pytest.fixture
def spy_generate(monkeypatch):
    """Record which shards a run generates (and still generate them)."""
    calls = []
    real = rollouts.generate_shard

    def spy(index, *args, **kwargs):
        calls.append(index)
        return real(index, *args, **kwargs)

    monkeypatch.setattr(rollouts, "generate_shard", spy)
    return calls


def _mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in sorted((root / "shards").iterdir())}


def test_rerunning_a_finished_dataset_regenerates_nothing(tiny_toy_model, small_dataset, tmp_path, spy_generate):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    before, files = _mtimes(root), shard_files(root)
    run(make_cfg(tiny_toy_model, root))
    assert spy_generate == []
    assert _mtimes(root) == before
    assert shard_files(root) == files


def test_leftovers_are_removed_and_unfinished_shards_regenerated_identically(tiny_toy_model, small_dataset,
                                                                            tmp_path, spy_generate):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    sh = root / "shards"
    original = shard_files(small_dataset)
    # shard 1 was being written when the job died: only a partial temporary tar is left
    for ext in ("tar", "parquet", "stats.json"):
        (sh / f"000001.{ext}").unlink()
    (sh / ".tmp-000001.tar").write_bytes(original["000001.tar"][:1000])
    # shard 2 died after its tar was renamed, before its stats: a tar without stats
    (sh / "000002.stats.json").unlink()
    (sh / "000002.parquet").unlink()
    kept_stats_mtime = (sh / "000000.stats.json").stat().st_mtime_ns
    (root / "manifest.json").unlink()

    run(make_cfg(tiny_toy_model, root))
    assert spy_generate == [1, 2]
    assert shard_files(root).keys() == original.keys()  # no .tmp- file is left
    for name in ("000000.tar", "000001.tar", "000001.parquet", "000002.tar", "000002.parquet"):
        assert shard_files(root)[name] == original[name], name
    assert (sh / "000000.stats.json").stat().st_mtime_ns == kept_stats_mtime
    assert json.loads((root / "manifest.json").read_text())["shards"] == \
        json.loads((small_dataset / "manifest.json").read_text())["shards"]


def test_a_shard_whose_files_do_not_match_its_stats_is_redone(tiny_toy_model, small_dataset, tmp_path,
                                                               spy_generate):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    tar = root / "shards" / "000000.tar"
    original = tar.read_bytes()
    tar.write_bytes(original[:-512])  # truncated after the fact
    run(make_cfg(tiny_toy_model, root))
    assert spy_generate == [0]
    assert tar.read_bytes() == original


def _refused(cfg, root):
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(GdroError) as info:
        run(cfg)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before, "a refused run must leave the folder untouched"
    return str(info.value)


def test_a_changed_config_is_refused_naming_the_keys(tiny_toy_model, small_dataset, tmp_path, spy_generate):
    root = copy_dataset(small_dataset, tmp_path / "ds")
    msg = _refused(make_cfg(tiny_toy_model, root, "sampler.steps=3"), root)
    assert "sampler.steps" in msg and "group_size" not in msg
    msg = _refused(make_cfg(tiny_toy_model, root, "rollouts.group_size=4"), root)
    assert "group_size" in msg and "sampler.steps" not in msg
    msg = _refused(make_cfg(tiny_toy_model, root, "sampler.steps=3", "rollouts.group_size=4",
                            "rollouts.base_seed=5"), root)
    assert "sampler.steps" in msg and "group_size" in msg and "seed_scheme.base_seed" in msg
    msg = _refused(make_cfg(tiny_toy_model, root, "rollouts.num_prompts=5"), root)
    assert "prompts.count" in msg
    assert spy_generate == []


def test_other_weights_in_the_same_model_folder_are_refused(tiny_toy_model, tmp_path):
    import shutil

    from conftest import build_tiny_toy_model

    model = tmp_path / "model"
    shutil.copytree(tiny_toy_model, model)
    root = run(make_cfg(model, tmp_path / "ds", "rollouts.num_prompts=2"))
    shutil.rmtree(model)
    build_tiny_toy_model(model, seed=1)  # retrained in place: same path, other weights
    msg = _refused(make_cfg(model, root, "rollouts.num_prompts=2"), root)
    assert "generator.weights_sha256" in msg and "model_path" not in msg


def test_more_tasks_than_shards_is_an_error(tiny_toy_model, tmp_path, spy_generate):
    with pytest.raises(GdroError, match="4 tasks for 3 shards"):
        run(make_cfg(tiny_toy_model, tmp_path / "ds"), task_id=0, num_tasks=4)
    assert spy_generate == []
    assert not list((tmp_path / "ds").glob("shards/*"))


@pytest.mark.parametrize("dies_after", [0, 1, 2, 3])
def test_an_interrupted_cleanup_never_leaves_a_stats_file_without_its_shard(small_dataset, tmp_path, monkeypatch,
                                                                           dies_after):
    """The stats file is the completion marker: written last, so it must be removed first. A job killed while
    removing a broken shard must not leave a stats file that says 'done' beside a missing tar."""
    from pathlib import Path

    from pipeline.dataset_identity import shard_is_complete

    root = copy_dataset(small_dataset, tmp_path / "ds")
    sh = root / "shards"
    (sh / "000000.tar").write_bytes(b"not the tar the stats describe")
    fingerprint = json.loads((root / "rollouts_config.json").read_text())["fingerprint"]

    class Killed(BaseException):
        pass

    real_unlink, done = Path.unlink, []

    def unlink(self, missing_ok=False):
        if len(done) == dies_after:
            raise Killed
        done.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        shard_is_complete(root, 0, fingerprint)
    monkeypatch.undo()
    if (sh / "000000.stats.json").exists():
        assert (sh / "000000.tar").exists() and (sh / "000000.parquet").exists(), f"removed {done} first"
    assert not shard_is_complete(root, 0, fingerprint)  # and a restart still redoes it
    assert not any((sh / f"000000.{ext}").exists() for ext in ("tar", "parquet", "stats.json"))
