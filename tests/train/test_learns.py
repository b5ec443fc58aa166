"""Stage two learns what the reward asks, and the test can tell: DGPO (and `dpo`, the toy preset's loss) on a
dataset scored by mean brightness raises the brightness of a fixed prompt set sampled with fixed noise, against
the base; the same run with the loss's sign flipped lowers it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gdro_testing import run_train

from .conftest import build_dataset
from .test_train_e2e import PROMPTS, REWARD, REWARD_MODULE, make_cfg

pytestmark = pytest.mark.slow


def _brightness(model_dir) -> float:
    from pipeline.backends.toy import ToyBackend
    from pipeline.eval.fixed_noise import sample_prompt_set
    from pipeline.prompt_files import load_prompts
    from pipeline.sampling import SamplerConfig

    metas = load_prompts(PROMPTS)[100:116]  # not the dataset's 16 prompts
    images = sample_prompt_set(ToyBackend.from_pretrained(model_dir), metas, SamplerConfig(steps=2), base_seed=5)
    return float(np.asarray(images, np.float64).mean() / 255.0)


@pytest.fixture(scope="module")
def bright_dataset(tiny_toy_model, tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("learns"), tiny_toy_model, REWARD.split(":")[0], REWARD_MODULE,
                         REWARD)


@pytest.mark.parametrize("loss", ["dgpo", "dpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_loss_moves_the_reward_of_held_out_prompts(bright_dataset, tiny_toy_model, sign, loss, monkeypatch):
    from stages import train

    if sign < 0:  # the same run, descending the reward instead
        real = train.group_loss

        def flipped(*args, **kwargs):
            out = real(*args, **kwargs)
            return dataclasses.replace(out, loss=-out.loss)

        monkeypatch.setattr(train, "group_loss", flipped)
    out = bright_dataset.parent / f"run_{loss}_sign{sign:+.0f}"
    run_train(make_cfg(tiny_toy_model, bright_dataset, out, f"train.loss={loss}", "train.steps=12",
                       "train.save_every=12"))
    before, after = _brightness(tiny_toy_model), _brightness(out / "export")
    if sign > 0:
        assert after > before + 0.01, (before, after)
    else:
        assert after < before - 0.01, (before, after)
