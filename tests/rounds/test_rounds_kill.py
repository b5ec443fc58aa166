"""`gdro rounds` killed (SIGKILL) at a random point and rerun ends with the datasets and the final model of an
uninterrupted chain; each manifest records the lineage; the summary table and curve are written."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gdro_testing import MEAN_PIXEL_MODULE, transformer_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REWARD = "gdro_rounds_reward:mean_pixel"
REWARD_MODULE = MEAN_PIXEL_MODULE


def command(model, out: Path) -> list[str]:
    sets = [f"model.path={model}", f"rollouts.prompts={REPO / 'prompts/toy_train.jsonl'}", "rollouts.num_prompts=8",
            "rollouts.prompts_per_shard=4", "rollouts.group_size=4", "sampler.steps=2", "rollouts.ref_cache_k=2",
            f'rollouts.rewards={{"{REWARD}": {{}}}}', f'train.reward_weights={{"{REWARD}": 1.0}}',
            "train.groups_per_step=4", "train.lr=1e-3", "train.warmup_steps=1", "train.beta=20", "train.steps=6",
            "train.save_every=2", f"eval.prompts={REPO / 'prompts/toy_test.jsonl'}", "eval.num_prompts=4",
            "eval.bootstrap=0"]
    return [sys.executable, "-m", "pipeline.cli", "rounds", "--rounds", "2", "--out", str(out),
            *(a for s in sets for a in ("--set", s))]


def env(tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WDS_SECURE="1",
             PYTHONPATH=os.pathsep.join([str(tmp / "reward_mod"), str(REPO), e.get("PYTHONPATH", "")]))
    return e


def shard_hashes(dataset: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((dataset / "manifest.json").read_text())["shards"]]


def test_a_killed_chain_ends_as_an_uninterrupted_one(tiny_toy_model, tmp_path):
    (tmp_path / "reward_mod").mkdir()
    (tmp_path / "reward_mod" / "gdro_rounds_reward.py").write_text(REWARD_MODULE)
    run_env = env(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    t0 = time.time()
    subprocess.run(command(tiny_toy_model, whole), env=run_env, check=True, cwd=REPO, capture_output=True)
    duration = time.time() - t0

    delay = random.uniform(0.15, 0.9) * duration
    print(f"SIGKILL after {delay:.1f} s of an uninterrupted {duration:.1f} s")  # shown when the test fails
    proc = subprocess.Popen(command(tiny_toy_model, killed), env=run_env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command(tiny_toy_model, killed), env=run_env, check=True, cwd=REPO, capture_output=True)

    for k in (1, 2):
        a, b = whole / f"round_{k}", killed / f"round_{k}"
        assert shard_hashes(a / "dataset") == shard_hashes(b / "dataset"), f"round {k}'s dataset differs"
        wa, wb = transformer_weights(a / "run" / "export"), transformer_weights(b / "run" / "export")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), f"round {k}'s model differs"
    assert not all(torch.equal(v, transformer_weights(tiny_toy_model)[n]) for n, v in wa.items())  # it trained

    manifest = json.loads((whole / "round_2" / "dataset" / "manifest.json").read_text())
    assert manifest["generator_lineage"] == [
        {"round": 1, "generator": str(tiny_toy_model), "dataset": "round_1/dataset", "run": "round_1/run"},
        {"round": 2, "generator": "round_1/run/export", "dataset": "round_2/dataset", "run": "round_2/run"}]
    assert manifest["generator"]["model_path"] == str(whole / "round_1" / "run" / "export")
    table = (whole / "summary.md").read_text()
    assert "| 0 (base) |" in table and "| 2 |" in table and (whole / "summary.png").stat().st_size > 0
