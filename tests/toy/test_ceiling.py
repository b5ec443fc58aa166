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


def _cfg(model, steps=40, extra=()) -> ExperimentConfig:
    return resolve(ExperimentConfig, preset="toy", overrides=(
        f"model.path={model}", "rollouts.num_prompts=12", "rollouts.group_size=4", f"train.steps={steps}",
        "train.groups_per_step=4", "train.warmup_steps=1", "train.ema_decay=0.0", *extra))


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


@pytest.mark.parametrize("lora_rank", [0, 16])
def test_the_ceiling_fits_true_renders_and_writes_a_model(tmp_path, tiny_toy_unet, lora_rank):
    """With train.lora_rank > 0 it trains the run's adapter and exports it merged: a plain model folder in
    which only the adapted projections differ from the base."""
    cfg = _cfg(tiny_toy_unet, extra=(f"train.lora_rank={lora_rank}",))
    # the tiny UNet's attention is a small share of it: its adapter fits more slowly than every weight
    export = ceiling.main(cfg, out=tmp_path / "c", lr=3e-2 if lora_rank else 3e-3)
    metas = load_prompts(cfg.rollouts.prompts)[:12]
    fitted, base = _true_render_loss(export, metas), _true_render_loss(tiny_toy_unet, metas)
    assert fitted < (0.95 if lora_rank else 0.8) * base
    info = json.loads((tmp_path / "c" / "ceiling.json").read_text())
    assert info["steps"] == 40 and info["images_per_step"] == 16 and info["t_draws"] == "pretrain"
    assert info["params"] == ("lora" if lora_rank else "full")
    before = ToyBackend.from_pretrained(tiny_toy_unet).transformer.state_dict()
    after = ToyBackend.from_pretrained(export).transformer.state_dict()
    assert after.keys() == before.keys()  # no lora_A/lora_B left: the adapter is merged
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = {k for k in before if k.endswith(".weight") and k.rsplit(".", 1)[0].endswith(
        tuple(cfg.train.lora_targets))}
    if lora_rank:
        assert moved and moved <= adapted
    else:
        assert moved - adapted  # full fine-tuning moves the convolutions too


def test_the_ceiling_lr_follows_the_parameters(tmp_path, tiny_toy_unet):
    """LoRA fits at train.lr (the run's), full fine-tuning at 1e-4; a LoRA ceiling needs an adapter."""
    cfg = _cfg(tiny_toy_unet, steps=1, extra=("train.lora_rank=4", "train.lr=2e-3"))
    ceiling.main(cfg, out=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "ceiling.json").read_text())["lr"] == 2e-3
    ceiling.main(cfg, out=tmp_path / "b", lora=False)
    info = json.loads((tmp_path / "b" / "ceiling.json").read_text())
    assert (info["lr"], info["params"]) == (ceiling.FULL_FT_LR, "full")
    with pytest.raises(GdroError, match="lora_rank"):
        ceiling.main(_cfg(tiny_toy_unet, steps=1, extra=("train.lora_rank=0",)), out=tmp_path / "c", lora=True)


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
