"""Recipe: pre-train the toy base model (text encoder + small UNet) on rendered scenes with noisy captions.

setup (or resume from <out>/state/) -> train (rectified flow on renders of random prompts, EMA) -> periodic
eval of the EMA weights on the held-out test prompts (the same verifier and sampler the rest of gdro uses) ->
save. The learning rate is constant after warm-up, so the weights at step k of a long run are the weights a
run with ``steps=k`` ends with: the shipped checkpoint is reproducible by stopping there.

Noisy captions, as on the web: with probability ``caption_noise`` a prompt of a ``noisy_kinds`` kind (presence,
counts, relations) is paired with a render of ``perturb(prompt)`` (one fact changed: a missing object, a count
off by one, another relation) that fails the original caption, which stays. The model learns to draw every
object cleanly, but its conditional distribution puts real mass on wrong compositions it can also draw right: the
kind of base that reward post-training improves (a real base's failures are of this kind, not of drawing).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.backends.base import Conditioning, transformer_velocity
from pipeline.backends.toy import TextEncoderConfig, ToyBackend, ToyTextEncoder, build_transformer, build_unet
from pipeline.config import ToyPretrainConfig, save_resolved, to_dict
from pipeline.ema import update_module_ema
from pipeline.errors import GdroError
from pipeline.eval.fixed_noise import sample_prompt_set
from pipeline.eval.tables import format_table, kind_table
from pipeline.flow import sample_t
from pipeline.prompt_files import load_prompts
from pipeline.sampling import SamplerConfig
from pipeline.toy.prompts import (
    DEFAULT_NOISE,
    KINDS,
    PERTURBED_KINDS,
    CaptionNoise,
    all_prompts,
    noisy_scene,
    sample_scene,
)
from pipeline.toy.scoring import score_images
from pipeline.toy.world import render, to_unit

PRETRAIN_T = {"law": "logit_normal", "t_min": 0.0, "t_max": 1.0}  # SD3's law; the ceiling's default too


def _batch(rng: np.random.Generator, by_kind: dict[str, list[dict]], n: int, dropout: float, noise: float,
           noisy_kinds: tuple[str, ...], how: CaptionNoise = DEFAULT_NOISE):
    prompts, images = [], []
    for _ in range(n):
        pool = by_kind[KINDS[int(rng.integers(len(KINDS)))]]
        meta = pool[int(rng.integers(len(pool)))]
        u = rng.random()  # drawn for every pair, so the noise settings change no other draw of the stream
        noisy = meta["tag"] in noisy_kinds and u < noise
        images.append(to_unit(render(noisy_scene(meta, rng, how) if noisy else sample_scene(meta, rng))))
        prompts.append("" if rng.random() < dropout else meta["prompt"])
    return prompts, torch.from_numpy(np.stack(images))


def evaluate(backend: ToyBackend, metas: list[dict], sampler: SamplerConfig, *, seed: int = 0,
             batch: int = 100) -> dict:
    """Sample one image per prompt line (seeded by line index) and score it with the verifier."""
    images = sample_prompt_set(backend, metas, sampler, base_seed=seed, batch=batch)
    return {"images": images, "table": kind_table(score_images(images, metas), [m["tag"] for m in metas])}


def _denoiser(cfg: ToyPretrainConfig):
    if cfg.denoiser == "unet":
        return build_unet(text_dim=cfg.text_dim, pooled_dim=cfg.text_dim, channels=tuple(cfg.unet_channels),
                          layers_per_block=cfg.unet_layers_per_block, head_dim=cfg.head_dim,
                          cross_attention_levels=cfg.unet_cross_attention)
    return build_transformer(text_dim=cfg.text_dim, pooled_dim=cfg.text_dim, layers=cfg.layers, heads=cfg.heads,
                             head_dim=cfg.head_dim, patch_size=cfg.patch_size)


# ------------------------------------------------------------------------------ resumable state (no pickle)
# Keys a resumed run may change: the length, the threads, and the cadence and size of evaluations and saves,
# none of which draws from the training RNGs (evaluation uses its own seeded noise).
RESUMABLE_CHANGES = ("steps", "threads", "out", "eval_every", "eval_n", "eval_prompts", "eval_sampler_steps",
                     "eval_guidance", "keep_every", "state_every")
def _save_state(folder: Path, step: int, model, ema, opt, sched, rng: np.random.Generator,
                gen: torch.Generator, cfg: ToyPretrainConfig) -> None:
    """Everything the next step depends on, as safetensors + JSON, written to a temporary folder and renamed."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    o = opt.state_dict()
    save_file({f"{i}.{k}": v.contiguous() for i, st in o["state"].items() for k, v in st.items()}
              | {"torch_generator": gen.get_state()}, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": o["param_groups"], "scheduler": sched.state_dict(),
            "numpy_rng": rng.bit_generator.state, "config": to_dict(cfg)}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_state(folder: Path, model, ema, opt, sched, rng: np.random.Generator, gen: torch.Generator,
                cfg: ToyPretrainConfig) -> int:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    saved, now = dict(meta["config"]), to_dict(cfg)
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differ:
        raise GdroError(f"{folder} is the state of a pre-training with other settings ({', '.join(differ)}); "
                        f"use another out= or delete {folder} to start afresh")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    gen.set_state(tensors.pop("torch_generator"))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's records up to `step` (a killed run may have logged steps after its last state)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _load_init(model: torch.nn.ModuleDict, folder: Path) -> None:
    """Start from a toy model folder's weights (continued pre-training); the architecture keys must match it."""
    try:
        init = ToyBackend.from_pretrained(folder)
    except (OSError, GdroError) as e:
        raise GdroError(f"init: {folder} is not a toy model folder ({e}); give the folder of a toy base, "
                        "e.g. models/toy-base") from e
    for name, part in (("text", init.text_encoder), ("transformer", init.transformer)):
        try:
            model[name].load_state_dict(part.state_dict())
        except RuntimeError as e:
            raise GdroError(f"init: {folder}'s {name} does not fit this config's architecture (set the same "
                            f"denoiser, unet_channels, text_dim as its pretrain_config.json): {e}") from e


def main(cfg: ToyPretrainConfig) -> Path:
    unknown = sorted(set(cfg.noisy_kinds) - set(PERTURBED_KINDS))
    if unknown:
        raise GdroError(f"noisy_kinds: {', '.join(unknown)} cannot be perturbed; choose from {', '.join(PERTURBED_KINDS)}")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "pretrain_config.json")
    text = ToyTextEncoder(TextEncoderConfig(dim=cfg.text_dim, pooled_dim=cfg.text_dim))
    model = torch.nn.ModuleDict({"text": text, "transformer": _denoiser(cfg)})
    if cfg.init:
        _load_init(model, Path(cfg.init))
    model["text"].requires_grad_(cfg.train_text_encoder)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy base model: {cfg.denoiser}, {n_params / 1e6:.2f} M parameters"
          + ("" if cfg.train_text_encoder else " (text encoder frozen)"))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dir = out / "state"
    start = 0
    if (state_dir / "state.json").is_file():
        start = _load_state(state_dir, model, ema, opt, sched, rng, gen, cfg)
        print(f"toy pretrain: resumed from {state_dir} at step {start}")
    _truncate_log(out / "pretrain_log.jsonl", start)
    by_kind = {k: [p for p in all_prompts() if p["tag"] == k] for k in KINDS}
    noise = CaptionNoise(relation=cfg.relation_noise, count=cfg.count_noise, color=cfg.color_noise)
    eval_metas = load_prompts(cfg.eval_prompts)[: cfg.eval_n]
    sampler = SamplerConfig(steps=cfg.eval_sampler_steps, guidance=cfg.eval_guidance)
    log = (out / "pretrain_log.jsonl").open("a")
    t0 = time.time()
    record: dict = {"step": start}
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="toy pretrain", unit="step", initial=start, total=cfg.steps)
    for step in bar:
        prompts, x0 = _batch(rng, by_kind, cfg.batch_size, cfg.caption_dropout, cfg.caption_noise,
                             tuple(cfg.noisy_kinds), noise)
        eps = torch.randn(x0.shape, generator=gen)
        t = sample_t(x0.shape[0], gen, **PRETRAIN_T)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        h, pooled = model["text"](model["text"].tokenize(prompts))
        v = transformer_velocity(model["transformer"], xt, t, Conditioning(h, pooled))
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        update_module_ema(ema, model, cfg.ema_decay if step > cfg.warmup_steps else 0.0)
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
        if step % cfg.state_every == 0 or step == cfg.steps:
            _save_state(state_dir, step, model, ema, opt, sched, rng, gen, cfg)
    final = ToyBackend(ema["transformer"], ema["text"])
    final.save_pretrained(out)
    (out / "pretrain_result.json").write_text(json.dumps(record, indent=1))
    return out
