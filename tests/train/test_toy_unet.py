"""The toy world's UNet denoiser (the class of models/toy-base) through both stages: stage one's cached
reference errors are what the UNet's velocity recomputes, stage two trains it (full and LoRA) and exports a
folder that loads as a UNet and differs from the base."""
from __future__ import annotations

import pytest
import torch
from gdro_testing import check_cached_reference_errors, run_train, transformer_weights

from .conftest import build_dataset
from .test_train_e2e import REWARD, REWARD_MODULE, G, make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unet_dataset(tiny_toy_unet, tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("unet"), tiny_toy_unet, REWARD.split(":")[0], REWARD_MODULE,
                         REWARD)


def test_cached_errors_are_the_unets(unet_dataset, tiny_toy_unet):
    from pipeline.backends.base import load_transformer, transformer_velocity

    tr = load_transformer("toy", str(tiny_toy_unet)).eval()
    assert type(tr).__name__ == "UNet2DConditionModel"
    assert check_cached_reference_errors(unet_dataset, lambda x, t, c: transformer_velocity(tr, x, t, c), G) == 32


@pytest.mark.parametrize("lora", [0, 4])
def test_unet_trains_and_exports(unet_dataset, tiny_toy_unet, lora):
    from pipeline.backends.toy import ToyBackend

    out = unet_dataset.parent / f"run_lora{lora}"
    run_train(make_cfg(tiny_toy_unet, unet_dataset, out, "train.steps=2", "train.save_every=2",
                       f"train.lora_rank={lora}"))
    exported, base = transformer_weights(out / "export"), transformer_weights(tiny_toy_unet)
    assert exported.keys() == base.keys()
    assert any(not torch.equal(exported[k], base[k]) for k in base)
    backend = ToyBackend.from_pretrained(out / "export")
    assert type(backend.transformer).__name__ == "UNet2DConditionModel"
