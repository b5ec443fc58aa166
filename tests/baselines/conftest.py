"""A tiny online task: the random toy model, 8 training prompts, G = 4, 2 sampler steps, a user reward (the mean
pixel value, so every group has spread: the toy verifier scores a random model's images all 0)."""
from __future__ import annotations

from pathlib import Path

import pytest
from gdro_testing import MEAN_PIXEL_MODULE

REPO = Path(__file__).resolve().parents[2]
REWARD = "gdro_online_reward:mean_pixel"
REWARD_MODULE = MEAN_PIXEL_MODULE


@pytest.fixture()
def online_cfg(tiny_toy_model, tmp_path, monkeypatch):
    (tmp_path / "reward_mod").mkdir()
    (tmp_path / "reward_mod" / "gdro_online_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "reward_mod"))

    def make(*overrides):
        from pipeline.config import ExperimentConfig, resolve

        return resolve(ExperimentConfig, preset="toy", overrides=[
            f"model.path={tiny_toy_model}", f"rollouts.prompts={REPO / 'prompts/toy_train.jsonl'}",
            "rollouts.num_prompts=8", "rollouts.group_size=4", "sampler.steps=2",
            f'rollouts.rewards={{"{REWARD}": {{}}}}', f'train.reward_weights={{"{REWARD}": 1.0}}',
            f"eval.prompts={REPO / 'prompts/toy_test.jsonl'}", "online.eval_num_prompts=4", "online.groups=2",
            "online.iterations=2", "online.eval_every=1", f"online.out={tmp_path / 'online'}", "train.beta=500",
            "online.lr=1e-2", *overrides])

    return make
