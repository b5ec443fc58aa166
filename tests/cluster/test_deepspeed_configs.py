"""Every DeepSpeed config shipped in cluster/deepspeed/ trains, checkpoints and exports (one rank, tiny model)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def overrides(model, ds):
    return [f"model.path={model}", f"rollouts.out={ds}", f"rollouts.prompts={REPO / 'prompts' / 'toy_train.jsonl'}",
            "rollouts.num_prompts=4", "rollouts.prompts_per_shard=4", "rollouts.group_size=2", "sampler.steps=1",
            "rollouts.ref_cache_k=1", f"train.dataset={ds}", "train.groups_per_step=2", "train.steps=2",
            "train.save_every=2"]


@pytest.fixture(scope="module")
def tiny_dataset(tiny_toy_model, tmp_path_factory):
    from pipeline.config import ExperimentConfig, resolve
    from stages.rollouts import main

    ds = tmp_path_factory.mktemp("ds_configs") / "ds"
    main(resolve(ExperimentConfig, preset="toy", overrides=overrides(tiny_toy_model, ds)))
    return ds


@pytest.mark.parametrize("name, stage, check", [
    ("zero2", 2, lambda z: z["overlap_comm"] is True),
    ("zero2_offload", 2, lambda z: z["offload_optimizer"]["device"] == "cpu"),
    ("zero3", 3, lambda z: z["stage3_gather_16bit_weights_on_model_save"] is True),
])
def test_shipped_deepspeed_configs_train_and_export(tiny_toy_model, tiny_dataset, tmp_path, monkeypatch, name, stage,
                                                    check):
    import deepspeed

    from pipeline.config import ExperimentConfig, resolve
    from stages.train import main

    seen = {}
    real = deepspeed.initialize

    def spy(*args, **kwargs):
        seen.update(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", spy)
    out = tmp_path / name
    cfg = resolve(ExperimentConfig, preset="toy", overrides=[
        *overrides(tiny_toy_model, tiny_dataset), f"train.out={out}", f"train.zero_stage={stage}",
        f"train.deepspeed_config={REPO / 'cluster' / 'deepspeed' / (name + '.json')}"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        main(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)
    zero = seen["zero_optimization"]
    assert zero["stage"] == stage and check(zero)
    assert seen["train_micro_batch_size_per_gpu"] == 2  # still filled from train.*
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert (Path(out) / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
