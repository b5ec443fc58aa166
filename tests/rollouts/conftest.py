"""Shared helpers for the stage-one (rollouts) tests: tiny configs and one small finished dataset.

The dataset is tiny on purpose (6 prompts, 3 shards of 2 prompts, G=3, 2 sampler steps, a batch of 4 images
that spans prompts) so that every test here runs in well under a second once the model is loaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "prompts" / "toy_train.jsonl"

# The small layout every test uses unless it says otherwise.
SMALL = ("rollouts.num_prompts=6", "rollouts.prompts_per_shard=2", "rollouts.group_size=3", "sampler.steps=2",
         "rollouts.batch_size=4", "rollouts.ref_cache_k=2")


def make_cfg(model, out, *overrides):
    """The toy preset pointed at a tiny model and a folder, with the small layout and any extra overrides."""
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, preset="toy", overrides=[f"model.path={model}", f"rollouts.out={out}",
                                                              f"rollouts.prompts={PROMPTS}", *SMALL, *overrides])


def run(cfg, **kwargs) -> Path:
    from stages.rollouts import main

    return main(cfg, **kwargs)


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_files(root: Path) -> dict[str, bytes]:
    """Every file under shards/ by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted((Path(root) / "shards").iterdir())}


@pytest.fixture(scope="session")
def small_dataset(tiny_toy_model, tmp_path_factory) -> Path:
    """A finished dataset (3 shards) built once; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("small_dataset") / "ds"
    run(make_cfg(tiny_toy_model, out))
    return out
