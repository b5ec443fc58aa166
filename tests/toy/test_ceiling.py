"""The ground-truth ceiling recipe: it fits true renders (the flow-matching loss on fresh true renders falls
against the base's), writes a loadable model folder and its record, and fits only the timesteps asked for."""
import json

import numpy as np
import pytest
import torch

import stages.toy_ceiling as ceiling
from pipeline.backends.base import transformer_velocity
from pipeline.backends.toy import ToyBackend
from pipeline.config import ExperimentConfig, resolve
from pipeline.errors import GdroError
from pipeline.flow import flow_errors
from pipeline.prompt_files import load_prompts
from pipeline.toy.prompts import sample_scene
from pipeline.toy.world import render, to_unit


def _cfg(model, steps=40) -> ExperimentConfig:
    return resolve(ExperimentConfig, preset="toy", overrides=(
        f"model.path={model}", "rollouts.num_prompts=12", "rollouts.group_size=4", f"train.steps={steps}",
        "train.groups_per_step=4", "train.warmup_steps=1", "train.ema_decay=0.0"))


def _true_render_loss(model_dir, metas, seed=123) -> float:
    """Mean flow-matching error of a model on fixed true renders, noise and timesteps (t in (0, 1))."""
    backend = ToyBackend.from_pretrained(model_dir)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    batch = [metas[i % len(metas)] for i in range(48)]
    x0 = torch.from_numpy(np.stack([to_unit(render(sample_scene(m, rng))) for m in batch]))
    eps, t = torch.randn(x0.shape, generator=gen), torch.rand(48, generator=gen) * 0.98 + 0.01
    cond = backend.encode_prompts([m["prompt"] for m in batch])
    with torch.no_grad():
        return float(flow_errors(lambda x, s, c: transformer_velocity(backend.transformer, x, s, c),
                                 x0, eps, t, cond).mean())


def test_the_ceiling_fits_true_renders_and_writes_a_model(tmp_path, tiny_toy_unet):
    cfg = _cfg(tiny_toy_unet)
    export = ceiling.main(cfg, out=tmp_path / "c", lr=3e-3)
    metas = load_prompts(cfg.rollouts.prompts)[:12]
    assert _true_render_loss(export, metas) < 0.8 * _true_render_loss(tiny_toy_unet, metas)
    info = json.loads((tmp_path / "c" / "ceiling.json").read_text())
    assert info["steps"] == 40 and info["images_per_step"] == 16 and info["t_draws"] == "pretrain"


@pytest.mark.parametrize("t_draws", ["pretrain", "training"])
def test_the_ceiling_fits_the_timesteps_asked_for(tmp_path, tiny_toy_unet, monkeypatch, t_draws):
    """pretrain: logit-normal on [0, 1] (values below the toy preset's clip of 0.5 occur); training: the
    preset's cached draws, uniform on [rollouts.t_min = 0.5, 1]."""
    drawn = []
    real = ceiling.sample_t

    def spy(*a, **kw):
        t = real(*a, **kw)
        drawn.append(t)
        return t

    monkeypatch.setattr(ceiling, "sample_t", spy)
    cfg = _cfg(tiny_toy_unet, steps=5)
    assert cfg.rollouts.t_min == 0.5
    ceiling.main(cfg, out=tmp_path / "c", t_draws=t_draws)
    t = torch.cat(drawn)
    assert len(t) == 5 * 16
    if t_draws == "training":
        assert float(t.min()) >= 0.5
    else:
        assert float(t.min()) < 0.5
    with pytest.raises(GdroError, match="t_draws"):
        ceiling.main(cfg, out=tmp_path / "d", t_draws="late")
