"""Recipe: the toy world's ground-truth ceiling, outside the paradigm. Not a way to train; a yardstick.

Fine-tunes the base with plain flow matching on *true renders* of the training prompts (the world's ground
truth, which offline reward training never sees), for the compute of the default `gdro train`: train.steps
optimiser steps of train.groups_per_step x rollouts.group_size images each (the images `gdro train` reads; a
pairwise loss passes only 2 of each group's G through the model, so for it the ceiling is the more generous
yardstick), EMA as train.ema_decay, and the same parameters as `gdro train`: the LoRA adapter of
train.lora_rank / lora_targets at train.lr when the run trains one (its adapter merged into the exported
weights), every weight at lr 1e-4 otherwise (full fine-tuning of the toy model at train.lr = 1e-5 moves too
little in 300 steps to be a yardstick). The gain of this model over the base on the held-out prompts (`gdro eval
--set eval.checkpoint=<out>/export`) is the most that better data for those prompts could give in that budget;
reward-trained runs are reported as a share of it. setup -> train (fresh scenes every step) -> <out>/export
(a model folder) + <out>/ceiling.json.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.adapters import merged, trainable
from pipeline.backends.base import transformer_velocity
from pipeline.backends.toy import ToyBackend
from pipeline.config import ExperimentConfig, save_resolved, to_dict
from pipeline.ema import update_module_ema
from pipeline.errors import GdroError
from pipeline.flow import flow_errors, sample_t
from pipeline.prompt_files import load_prompts
from pipeline.toy.prompts import sample_scene
from pipeline.toy.world import render, to_unit
from stages.toy_pretrain import PRETRAIN_T

FULL_FT_LR = 1e-4


def main(cfg: ExperimentConfig, *, out: Path, lr: float | None = None, seed: int = 0, t_draws: str = "pretrain",
         lora: bool | None = None) -> Path:
    """t_draws: "pretrain" (logit-normal on [0, 1], the pre-training law) or "training" (the law and range of
    the dataset's cached draws, rollouts.t_law on [rollouts.t_min, rollouts.t_max]: the timesteps `gdro train`
    sees, so only what a reward run could reach is fitted). lora: None follows train.lora_rank; False fits
    every weight. lr: None is train.lr with LoRA, FULL_FT_LR without."""
    if t_draws not in ("pretrain", "training"):
        raise GdroError(f"t_draws must be pretrain or training, got {t_draws!r}")
    r = cfg.rollouts
    draws = PRETRAIN_T if t_draws == "pretrain" else {"law": r.t_law, "t_min": r.t_min, "t_max": r.t_max}
    if cfg.model.backend != "toy":
        raise GdroError("the ground-truth ceiling needs the toy world's renderer: model.backend must be toy")
    t = cfg.train
    lora = t.lora_rank > 0 if lora is None else lora
    if lora and not t.lora_rank:
        raise GdroError("a LoRA ceiling needs train.lora_rank > 0")
    lr = lr if lr is not None else (t.lr if lora else FULL_FT_LR)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.json")
    metas = load_prompts(cfg.rollouts.prompts)
    metas = metas[: cfg.rollouts.num_prompts] if cfg.rollouts.num_prompts else metas
    base = ToyBackend.from_pretrained(cfg.model.path)
    policy = base.transformer.train()
    params = trainable(policy, t, lora)  # the adapter `gdro train` trains (same config), on the frozen base
    ema = copy.deepcopy(policy).eval().requires_grad_(False) if t.ema_decay else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(t.warmup_steps, 1)))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    n = t.groups_per_step * cfg.rollouts.group_size
    t0 = time.time()
    bar = tqdm(range(1, t.steps + 1), desc="toy ceiling", unit="step")
    for _step in bar:
        batch = [metas[int(i)] for i in rng.integers(len(metas), size=n)]
        x0 = torch.from_numpy(np.stack([to_unit(render(sample_scene(m, rng))) for m in batch]))
        cond = base.encode_prompts([m["prompt"] for m in batch])  # the frozen text encoder, as in stage one
        tt = sample_t(n, gen, **draws)
        eps = torch.randn(x0.shape, generator=gen)
        loss = flow_errors(lambda x, s, c: transformer_velocity(policy, x, s, c), x0, eps, tt, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        if ema is not None:
            update_module_ema(ema, policy, t.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    wall = time.time() - t0
    fitted = (ema if ema is not None else policy).eval()
    if lora:  # a plain model folder: the adapter merged into the base weights, as `gdro train` exports
        fitted = merged(fitted, cfg.model.backend, cfg.model.path, t).eval()
    final = ToyBackend(fitted, base.text_encoder)
    tmp = out / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp)
    shutil.rmtree(out / "export", ignore_errors=True)
    tmp.rename(out / "export")
    info = {"steps": t.steps, "images_per_step": n, "params": "lora" if lora else "full", "lr": lr, "seed": seed,
            "ema_decay": t.ema_decay, "t_draws": t_draws, "t_law": draws["law"], "t_range": [draws["t_min"], draws["t_max"]],
            "train_prompts": len(metas), "wall_s": round(wall, 1), "base": cfg.model.path,
            "train": to_dict(t)}
    (out / "ceiling.json").write_text(json.dumps(info, indent=1) + "\n")
    return out / "export"
