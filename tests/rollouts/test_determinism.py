"""Same config -> same bytes, whatever the task split; seeds depend on (base_seed, prompt_id, member) only;
task ids come from Slurm / torchrun / explicit values."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from .conftest import make_cfg, run, shard_files


def _tables(root):
    return {p.name: pq.read_table(p) for p in sorted((root / "shards").glob("*.parquet"))}


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _assert_same_dataset(a, b):
    fa, fb = shard_files(a), shard_files(b)
    tars = sorted(n for n in fa if n.endswith(".tar"))
    assert tars == sorted(n for n in fb if n.endswith(".tar")) and len(tars) == 3
    for name in tars:
        assert fa[name] == fb[name], f"{name} differs between the two runs"
    ta, tb = _tables(a), _tables(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].equals(tb[name]), f"{name} contents differ"
    ma, mb = _manifest(a), _manifest(b)
    assert ma["shards"] == mb["shards"]
    assert ma["totals"] == mb["totals"] and ma["fingerprint"] == mb["fingerprint"]


def test_same_config_twice_gives_identical_bytes(tiny_toy_model, small_dataset, tmp_path):
    again = run(make_cfg(tiny_toy_model, tmp_path / "again"))
    _assert_same_dataset(small_dataset, again)
    # and the Parquet files themselves are byte-identical (checksummed in the manifest)
    for name in ("000000.parquet", "000001.parquet", "000002.parquet"):
        assert (small_dataset / "shards" / name).read_bytes() == (again / "shards" / name).read_bytes()


def test_one_task_and_three_tasks_give_identical_datasets(tiny_toy_model, small_dataset, tmp_path):
    out = tmp_path / "split"
    cfg = make_cfg(tiny_toy_model, out)
    for t in (2, 0, 1):  # any order; each task only writes its own shards
        run(cfg, task_id=t, num_tasks=3)
        stats = sorted(p.name for p in (out / "shards").glob("*.stats.json"))
        assert f"{t:06d}.stats.json" in stats
    run(cfg, assemble_only=True)
    _assert_same_dataset(small_dataset, out)
    tasks = {json.loads(p.read_text())["task_id"] for p in (out / "shards").glob("*.stats.json")}
    assert tasks == {0, 1, 2}


def test_two_tasks_write_only_their_shards(tiny_toy_model, tmp_path):
    out = tmp_path / "half"
    run(make_cfg(tiny_toy_model, out), task_id=1, num_tasks=2)
    assert sorted(p.name for p in (out / "shards").glob("*.stats.json")) == ["000001.stats.json"]
    assert not (out / "manifest.json").exists()  # assembled only when every shard is done


def _expected_seed(base_seed, prompt_id, member, purpose="sample"):
    d = hashlib.sha256(f"{base_seed}:{prompt_id}:{member}:{purpose}".encode()).digest()
    return int.from_bytes(d[:8], "little") & (2**63 - 1)


def test_seed_function_is_the_documented_hash():
    from schemas.seeds import member_seed

    for base, pid, m in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (7, 123456, 5), (2**31, 10**9, 63)]:
        assert member_seed(base, pid, m) == _expected_seed(base, pid, m)
        assert member_seed(base, pid, m, "ref_eps1") == _expected_seed(base, pid, m, "ref_eps1")
    seeds = {member_seed(b, p, m) for b in (0, 1) for p in range(5) for m in range(4)}
    assert len(seeds) == 40  # every (base, prompt, member) gets its own seed


def test_stored_seeds_and_latents_follow_the_seed_scheme(tiny_toy_model, small_dataset):
    """The dataset's seeds are the hash of (base_seed, prompt_id, member), and member m's latents are what
    sampling from CPU float32 noise drawn with that seed gives."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    table = pq.read_table(small_dataset / "shards" / "000001.parquet").to_pandas()
    for _, row in table.iterrows():
        assert row["seed"] == _expected_seed(0, row["prompt_id"], row["member"])
    assert sorted(set(table["prompt_id"])) == [2, 3]  # shard 1 holds prompts [2, 4)

    with tarfile.open(small_dataset / "shards" / "000001.tar") as tf:
        data = {m.name: tf.extractfile(m).read() for m in tf}
    key = "000000003"
    rec = json.loads(data[f"{key}.json"])
    assert rec["seeds"] == [_expected_seed(0, 3, m) for m in range(3)]
    latents = np.load(io.BytesIO(data[f"{key}.latents.npy"]), allow_pickle=False)
    pe = torch.from_numpy(np.load(io.BytesIO(data[f"{key}.prompt_embeds.npy"]), allow_pickle=False))
    pooled = torch.from_numpy(np.load(io.BytesIO(data[f"{key}.pooled_embeds.npy"]), allow_pickle=False))

    model = SD3Transformer2DModel.from_pretrained(tiny_toy_model / "transformer").eval()
    noise = torch.stack([torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                         for s in rec["seeds"]])
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(2)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            v = model(hidden_states=x, timestep=t.expand(3).float(),
                      encoder_hidden_states=pe.expand(3, -1, -1), pooled_projections=pooled.expand(3, -1),
                      return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
    np.testing.assert_allclose(latents, x.numpy(), rtol=1e-4, atol=1e-5)


def test_base_seed_changes_the_samples(tiny_toy_model, small_dataset, tmp_path):
    other = run(make_cfg(tiny_toy_model, tmp_path / "seed1", "rollouts.base_seed=1", "rollouts.num_prompts=2"))
    a = pq.read_table(small_dataset / "shards" / "000000.parquet").column("seed").to_pylist()
    b = pq.read_table(other / "shards" / "000000.parquet").column("seed").to_pylist()
    assert b == [_expected_seed(1, p, m) for p in (0, 1) for m in range(3)]
    assert set(a).isdisjoint(b)
    assert (small_dataset / "shards" / "000000.tar").read_bytes() != (other / "shards" / "000000.tar").read_bytes()


# ------------------------------------------------------------------------------------------------ task ids
_ENV = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "RANK",
        "WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_task_from_env_defaults_to_one_task(clean_env):
    from pipeline.distributed import task_from_env

    assert task_from_env() == (0, 1)


def test_task_from_env_reads_slurm_array(clean_env):
    from pipeline.distributed import task_from_env

    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert task_from_env() == (3, 4)
    # an array that starts at 10 (--array=10-13): ids are offset by the minimum
    clean_env.setenv("SLURM_ARRAY_TASK_ID", "12")
    clean_env.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert task_from_env() == (2, 4)
    clean_env.delenv("SLURM_ARRAY_TASK_COUNT")
    clean_env.setenv("SLURM_ARRAY_TASK_MAX", "13")
    assert task_from_env() == (2, 4)
    # Slurm wins over torchrun variables when both are present
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    assert task_from_env() == (2, 4)


def test_task_from_env_reads_torchrun(clean_env):
    from pipeline.distributed import task_from_env

    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    assert task_from_env() == (1, 2)
    clean_env.delenv("RANK")
    assert task_from_env() == (0, 2)


def test_explicit_task_values_win(clean_env):
    from pipeline.distributed import task_from_env

    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    assert task_from_env(1, 3) == (1, 3)
    assert task_from_env(0, 1) == (0, 1)


def test_one_explicit_value_takes_the_other_from_the_environment(clean_env):
    """`--task-id` alone inside a Slurm array of 4 means 'task k of 4' (the CLI help: --num-tasks defaults to
    the Slurm array size), not 'task k of 1'."""
    from pipeline.distributed import task_from_env

    clean_env.setenv("SLURM_ARRAY_TASK_ID", "3")
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert task_from_env(task_id=2) == (2, 4)
    assert task_from_env(num_tasks=8) == (3, 8)


@pytest.mark.parametrize("env,explicit", [
    ({}, (3, 3)),
    ({}, (-1, 2)),
    ({}, (0, 0)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, (None, None)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}, (None, None)),
    ({"RANK": "2", "WORLD_SIZE": "2"}, (None, None)),
])
def test_out_of_range_task_is_an_error(clean_env, env, explicit):
    from pipeline.distributed import task_from_env
    from pipeline.errors import GdroError

    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(GdroError, match="outside"):
        task_from_env(*explicit)


# ------------------------------------------------------------------------------------------------ concurrent tasks
def _at_once(fns, stagger=0.05):
    """Run the callables in threads started `stagger` s apart; return their exceptions (None where fine)."""
    import threading
    import time

    errors = [None] * len(fns)

    def call(i):
        try:
            fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
        time.sleep(stagger)
    for th in threads:
        th.join()
    return errors


@pytest.fixture
def slow_rename(monkeypatch):
    """A slow shared file system: every rename takes 0.2 s, so tasks overlap while writing shared files."""
    import os
    import time

    real = os.replace

    def slow(src, dst):
        time.sleep(0.2)
        real(src, dst)

    monkeypatch.setattr(os, "replace", slow)


def test_tasks_starting_together_on_a_fresh_folder_all_succeed(tiny_toy_model, tmp_path, slow_rename):
    """Array tasks start at the same moment: each records the run config, none may fail or see a torn file."""
    from stages.rollouts import plan

    cfg = make_cfg(tiny_toy_model, tmp_path / "ds")
    errors = _at_once([lambda: plan(cfg)] * 3)
    assert errors == [None] * 3, errors
    record = json.loads((tmp_path / "ds" / "rollouts_config.json").read_text())
    assert record["fingerprint"] == plan(cfg).fingerprint


def test_tasks_finishing_together_all_assemble_the_manifest(tiny_toy_model, small_dataset, tmp_path, slow_rename):
    """The last tasks of an array can finish at the same moment; each may write the manifest."""
    import shutil

    from schemas.manifest import assemble_manifest

    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    (root / "manifest.json").unlink()
    errors = _at_once([lambda: assemble_manifest(root)] * 3)
    assert errors == [None] * 3, errors
    assert json.loads((root / "manifest.json").read_text()) == json.loads((small_dataset / "manifest.json").read_text())
