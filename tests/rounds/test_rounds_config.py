"""How `gdro rounds` wires a round: which model it samples and trains from, what it is evaluated against, the
lineage its manifest records; a chain folder made with another configuration is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ExperimentConfig, resolve, save_resolved
from pipeline.errors import GdroError
from stages import rounds


def test_round_k_samples_and_trains_from_round_k_minus_1_and_is_evaluated_against_the_base(tmp_path):
    cfg = resolve(ExperimentConfig, preset="toy", overrides=["model.path=/models/base"])
    rc1, ec1 = rounds.round_config(cfg, tmp_path, 1)
    rc3, ec3 = rounds.round_config(cfg, tmp_path, 3)
    assert rc1.model.path == "/models/base"
    assert rc3.model.path == str(tmp_path / "round_2" / "run" / "export")
    assert rc3.rollouts.out == rc3.train.dataset == str(tmp_path / "round_3" / "dataset")
    assert rc3.train.out == str(tmp_path / "round_3" / "run")
    assert ec3.model.path == "/models/base" and ec3.eval.checkpoint == str(tmp_path / "round_3" / "run" / "export")
    assert ec1.eval.out != ec3.eval.out
    assert rc3.rollouts.lineage == [
        {"round": 1, "generator": "/models/base", "dataset": "round_1/dataset", "run": "round_1/run"},
        {"round": 2, "generator": "round_1/run/export", "dataset": "round_2/dataset", "run": "round_2/run"},
        {"round": 3, "generator": "round_2/run/export", "dataset": "round_3/dataset", "run": "round_3/run"}]
    assert cfg.rollouts.lineage == [] and cfg.model.path == "/models/base"  # the chain's config is untouched


def test_a_chain_made_with_another_configuration_is_refused(tmp_path):
    cfg = resolve(ExperimentConfig, preset="toy")
    other = resolve(ExperimentConfig, preset="toy", overrides=["train.lr=3e-5", f"model.path={Path.cwd() / 'models/toy-base'}"])
    save_resolved(other, tmp_path / "config.json")
    before = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(GdroError, match="another configuration"):
        rounds.main(cfg, rounds=2, out=tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == before and not (tmp_path / "round_1").exists()


def test_a_lineage_in_the_config_is_part_of_the_dataset_identity():
    from pipeline.dataset_identity import identity
    from pipeline.prompt_files import load_prompts

    cfg = resolve(ExperimentConfig, preset="toy")
    prompts = load_prompts(cfg.rollouts.prompts)[:4]
    plain = identity(cfg, prompts)
    assert "generator_lineage" not in plain  # a plain dataset's identity (and fingerprint) is as before
    cfg.rollouts.lineage = [{"round": 1, "generator": "models/toy-base", "dataset": "round_1/dataset",
                             "run": "round_1/run"}]
    assert identity(cfg, prompts)["generator_lineage"] == cfg.rollouts.lineage
