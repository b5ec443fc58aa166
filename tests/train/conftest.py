"""Helpers for the stage-two tests that run the real `gdro train` in subprocesses (SIGKILL resume, torchrun).

Every subprocess gets one thread (CPU kernels may round differently with another thread count, and the runs
compared must do the same arithmetic) and none of the distributed variables the test process might carry.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def build_dataset(root: Path, model, module: str, source: str, reward: str, *overrides) -> Path:
    """A finished dataset at root/'data' scored by the user reward `module:function` written from `source` (the
    e2e layout: G = 4, K = 2 cached reference draws, 2 sampler steps; `overrides` change it)."""
    from stages.rollouts import main as rollouts

    from .test_train_e2e import make_cfg

    (root / "reward_mod").mkdir(parents=True)
    (root / "reward_mod" / f"{module}.py").write_text(source)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "reward_mod"))
        return rollouts(make_cfg(model, root / "data", None, f'rollouts.rewards={{"{reward}": {{}}}}', *overrides))


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WDS_SECURE="1")
    return env


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    """`gdro train` (python -m pipeline.cli) with --set overrides; under torchrun when nproc > 1."""
    launcher = [sys.executable, "-m", "pipeline.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "pipeline.cli"]
    args = [*launcher, "train"]
    for o in overrides:
        args += ["--set", o]
    return args


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
