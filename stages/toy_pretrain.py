"""Recipe: pre-train the toy base model (text encoder + tiny SD3 transformer) on rendered scenes.

setup -> train (rectified flow on random true renders of random prompts, EMA) -> periodic eval of the EMA
weights on the held-out test prompts (the same verifier and sampler the rest of gdro uses) -> save.
The learning rate is constant after warm-up, so the weights at step k of a long run are the weights a run with
``steps=k`` ends with: the shipped checkpoint is reproducible by stopping there.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.backends.toy import TextEncoderConfig, ToyBackend, ToyTextEncoder, build_transformer
from pipeline.config import ToyPretrainConfig, save_resolved
from pipeline.evaluation import sample_prompt_set
from pipeline.flow import sample_t
from pipeline.prompts import load_prompts
from pipeline.sampling import SamplerConfig
from pipeline.toy.prompts import KINDS, all_prompts, sample_scene
from pipeline.toy.scoring import format_table, kind_table, score_images
from pipeline.toy.world import render, to_unit


def _batch(rng: np.random.Generator, by_kind: dict[str, list[dict]], n: int, dropout: float):
    prompts, images = [], []
    for _ in range(n):
        pool = by_kind[KINDS[int(rng.integers(len(KINDS)))]]
        meta = pool[int(rng.integers(len(pool)))]
        images.append(to_unit(render(sample_scene(meta, rng))))
        prompts.append("" if rng.random() < dropout else meta["prompt"])
    return prompts, torch.from_numpy(np.stack(images))


def evaluate(backend: ToyBackend, metas: list[dict], sampler: SamplerConfig, *, seed: int = 0,
             batch: int = 100) -> dict:
    """Sample one image per prompt line (seeded by line index) and score it with the verifier."""
    images = sample_prompt_set(backend, metas, sampler, base_seed=seed, batch=batch)
    return {"images": images, "table": kind_table(score_images(images, metas), [m["tag"] for m in metas])}


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def main(cfg: ToyPretrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "pretrain_config.json")
    text = ToyTextEncoder(TextEncoderConfig(dim=cfg.text_dim, pooled_dim=cfg.text_dim))
    transformer = build_transformer(text_dim=cfg.text_dim, pooled_dim=cfg.text_dim, layers=cfg.layers,
                                    heads=cfg.heads, head_dim=cfg.head_dim, patch_size=cfg.patch_size)
    model = torch.nn.ModuleDict({"text": text, "transformer": transformer})
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy base model: {n_params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    by_kind = {k: [p for p in all_prompts() if p["tag"] == k] for k in KINDS}
    eval_metas = load_prompts(cfg.eval_prompts)[: cfg.eval_n]
    sampler = SamplerConfig(steps=cfg.eval_sampler_steps, guidance=cfg.eval_guidance)
    log = (out / "pretrain_log.jsonl").open("a")
    t0 = time.time()
    bar = tqdm(range(1, cfg.steps + 1), desc="toy pretrain", unit="step")
    for step in bar:
        prompts, x0 = _batch(rng, by_kind, cfg.batch_size, cfg.caption_dropout)
        eps = torch.randn(x0.shape, generator=gen)
        t = sample_t(x0.shape[0], gen, law="logit_normal", t_min=0.0, t_max=1.0)  # SD3's law
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        h, pooled = model["text"](model["text"].tokenize(prompts))
        v = model["transformer"](hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=h,
                                 pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, cfg.ema_decay if step > cfg.warmup_steps else 0.0)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"step": step, "loss": loss.item(), "grad_norm": float(gnorm), "elapsed_s": time.time() - t0}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            backend = ToyBackend(ema["transformer"], ema["text"])
            result = evaluate(backend, eval_metas, sampler)
            record["eval"] = result["table"]
            tqdm.write(f"step {step}  ({time.time() - t0:.0f} s)\n{format_table(result['table'])}")
            if cfg.keep_every and step % cfg.keep_every == 0:
                backend.save_pretrained(out / f"step_{step:06d}")
        log.write(json.dumps(record) + "\n")
        log.flush()
    final = ToyBackend(ema["transformer"], ema["text"])
    final.save_pretrained(out)
    (out / "pretrain_result.json").write_text(json.dumps(record, indent=1))
    return out
