"""A failing reward costs rows, not the shard; the cached reference errors are the frozen model's real
flow-matching errors; `gdro inspect` and `gdro status` report what is on disk."""
from __future__ import annotations

import hashlib
import io
import json
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from gdro_testing import tar_groups
from PIL import Image

from pipeline.errors import GdroError

from .conftest import make_cfg, run

G = 3
BAD_PROMPT = "a photo of two triangles"  # prompt 2 of toy_train.jsonl (shard 1, first group)
SCORER = "gdro_test_user_scorer"


@pytest.fixture
def user_scorer(tmp_path, monkeypatch):
    (tmp_path / f"{SCORER}.py").write_text(textwrap.dedent('''
        import numpy as np

        def brightness(bad_prompt):
            def fn(images, prompts, metadata):
                if bad_prompt in prompts:
                    raise RuntimeError("cannot score " + repr(bad_prompt))
                return np.array([img.mean() / 255.0 for img in images]), {}
            return fn

        brightness.version = "7"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{SCORER}:brightness"


def test_a_user_scorer_that_raises_fails_rows_not_the_shard(tiny_toy_model, tmp_path, user_scorer):
    cfg = make_cfg(tiny_toy_model, tmp_path / "ds", "rollouts.num_prompts=4", "rollouts.ref_cache_k=0")
    cfg.rollouts.rewards = {user_scorer: {"bad_prompt": BAD_PROMPT}, "toy_quality": {}}
    root = run(cfg)
    col = f"reward_{user_scorer}"

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["totals"]["failed_images"] == G
    assert [r for r in manifest["rewards"] if r["name"] == user_scorer] == \
        [{"name": user_scorer, "version": "7", "params": {"bad_prompt": BAD_PROMPT}}]
    assert [s["failed_images"] for s in manifest["shards"]] == [0, G]

    for shard in (0, 1):
        table = pq.read_table(root / "shards" / f"{shard:06d}.parquet")
        rows = table.to_pylist()
        assert len(rows) == 2 * G
        groups = tar_groups(root / "shards" / f"{shard:06d}.tar")
        for row in rows:
            rec = json.loads(groups[row["key"]]["json"])
            m = row["member"]
            if row["prompt"] == BAD_PROMPT:
                assert row["status"] == "error"
                assert user_scorer in row["error"] and "RuntimeError" in row["error"]
                assert "cannot score" in row["error"]
                assert row[col] is None
                assert row["reward_toy_quality"] is not None  # the other reward still scored the image
                assert rec["status"][m] == "error" and rec["errors"][m] == row["error"]
                assert rec["rewards"][user_scorer][m] is None
            else:
                assert row["status"] == "ok" and row["error"] == ""
                img = np.asarray(Image.open(io.BytesIO(groups[row["key"]][f"{m}.png"])).convert("RGB"))
                assert row[col] == pytest.approx(img.mean() / 255.0, rel=1e-12)
                assert rec["rewards"][user_scorer][m] == row[col]
    assert sum(r["prompt"] == BAD_PROMPT for r in pq.read_table(root / "shards" / "000001.parquet").to_pylist()) \
        == G

    from schemas.manifest import verify_dataset

    assert verify_dataset(root) == []  # failures are rows too: the dataset is sound


@pytest.mark.parametrize("name,match", [
    ("no_such_reward", "unknown reward"),
    ("gdro_no_such_module_xyz:make", "cannot import the user scorer"),
])
def test_an_unknown_reward_is_an_error(tiny_toy_model, tmp_path, name, match):
    cfg = make_cfg(tiny_toy_model, tmp_path / "ds")
    cfg.rollouts.rewards = {name: {}}
    with pytest.raises(GdroError, match=match) as info:
        run(cfg)
    assert f"rollouts.rewards.{name}" in str(info.value)
    assert not (tmp_path / "ds" / "shards").exists()


def test_bad_reward_parameters_are_an_error(tiny_toy_model, tmp_path):
    cfg = make_cfg(tiny_toy_model, tmp_path / "ds")
    cfg.rollouts.rewards = {"toy_quality": {"no_such_param": 1}}
    with pytest.raises(GdroError, match="rollouts.rewards.toy_quality: bad parameters"):
        run(cfg)


# ----------------------------------------------------------------------------------- reference-error cache
def _seed(base, pid, member, purpose):
    d = hashlib.sha256(f"{base}:{pid}:{member}:{purpose}".encode()).digest()
    return int.from_bytes(d[:8], "little") & (2**63 - 1)


def test_cached_reference_errors_match_an_independent_computation(tiny_toy_model, small_dataset):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(tiny_toy_model / "transformer").eval()
    groups = tar_groups(small_dataset / "shards" / "000002.tar")
    assert sorted(groups) == ["000000004", "000000005"]
    for raw in groups.values():
        rec = json.loads(raw["json"])
        pid = rec["prompt_id"]
        x0 = torch.from_numpy(np.load(io.BytesIO(raw["latents.npy"]), allow_pickle=False))
        pe = torch.from_numpy(np.load(io.BytesIO(raw["prompt_embeds.npy"]), allow_pickle=False))
        pooled = torch.from_numpy(np.load(io.BytesIO(raw["pooled_embeds.npy"]), allow_pickle=False))
        assert len(rec["ref_t"]) == len(rec["ref_noise_seeds"]) == len(rec["ref_errors"]) == 2
        for k in range(2):
            # t_k ~ U(t_min, t_max) from its own seeded generator (the toy preset clips to [0.5, 1], DGPO's
            # timestep clip); the noise seed is shared by the group
            t_gen = torch.Generator().manual_seed(_seed(0, pid, 0, f"ref_t{k}"))
            u = float(torch.rand(1, generator=t_gen)[0])
            assert rec["ref_t"][k] == pytest.approx(0.5 + 0.5 * u, abs=1e-7)
            assert 0.5 <= rec["ref_t"][k] <= 1.0
            seed = rec["ref_noise_seeds"][k]
            assert seed == _seed(0, pid, 0, f"ref_eps{k}")
            t = torch.tensor(rec["ref_t"][k], dtype=torch.float32)
            eps = torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            eps = eps.expand(G, -1, -1, -1)
            xt = (1 - t) * x0 + t * eps
            with torch.no_grad():
                v = model(hidden_states=xt, timestep=(1000 * t).expand(G), encoder_hidden_states=pe.expand(G, -1, -1),
                          pooled_projections=pooled.expand(G, -1), return_dict=False)[0]
            err = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)).numpy()
            np.testing.assert_allclose(rec["ref_errors"][k], err, rtol=1e-5)
            assert len(set(rec["ref_errors"][k])) == G  # one error per member, not one per group
        assert rec["ref_t"][0] != rec["ref_t"][1]


def test_no_cache_when_k_is_zero(tiny_toy_model, tmp_path):
    root = run(make_cfg(tiny_toy_model, tmp_path / "ds", "rollouts.ref_cache_k=0", "rollouts.num_prompts=2"))
    rec = json.loads(tar_groups(root / "shards" / "000000.tar")["000000000"]["json"])
    assert rec["ref_t"] == rec["ref_noise_seeds"] == rec["ref_errors"] == []
    assert json.loads((root / "manifest.json").read_text())["reference_cache"]["K"] == 0


# ------------------------------------------------------------------------------------------------ inspect, status
def test_inspect_writes_a_contact_sheet_and_prints_reward_means(tiny_toy_model, tmp_path, user_scorer):
    from click.testing import CliRunner

    from pipeline.cli import cli

    cfg = make_cfg(tiny_toy_model, tmp_path / "ds", "rollouts.num_prompts=4", "rollouts.ref_cache_k=0")
    cfg.rollouts.rewards = {user_scorer: {"bad_prompt": BAD_PROMPT}, "toy_quality": {}}
    root = run(cfg)
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["inspect", str(root), "--sheet", str(sheet), "--groups", "4"])
    assert result.exit_code == 0, result.output
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    df = pq.read_table(sorted((root / "shards").glob("*.parquet"))).to_pandas()
    lines = result.output.splitlines()
    assert f"4 groups, {4 * G} images, {G} failed" in lines[0]
    brightness = df[f"reward_{user_scorer}"]
    assert brightness.isna().sum() == G and brightness.mean() > 0
    for name in (user_scorer, "toy_quality"):
        line = next(line for line in lines if line.startswith(name))
        assert float(line.split()[1]) == pytest.approx(df[f"reward_{name}"].mean(), abs=5e-4), line


def test_status_counts_finished_shards(small_dataset, tmp_path):
    import shutil

    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["status", str(small_dataset)])
    assert result.exit_code == 0, result.output
    assert "3/3 shards done" in result.output and "18 images" in result.output
    assert "manifest: written" in result.output

    root = tmp_path / "ds"
    shutil.copytree(small_dataset, root)
    (root / "shards" / "000001.stats.json").unlink()
    (root / "shards" / ".tmp-000001.tar").write_bytes(b"partial")
    # the job was killed (or is) writing shard 1's stats: a temporary stats file is not a finished shard
    (root / "shards" / ".tmp-000001.stats.json").write_text('{"shard": "000001", "gro')
    result = CliRunner().invoke(cli, ["status", str(root)])
    assert result.exit_code == 0, result.output
    assert "2/3 shards done" in result.output and "12 images" in result.output
    assert ".tmp-000001.tar" in result.output and ".tmp-000001.stats.json" in result.output
