"""Recipe: the full-size benchmark for one GPU (`gdro bench --full-size`, `make bench-gpu`).

SD3.5-Medium's transformer and VAE built from their published configs with random weights
(`pipeline/backends/random_sd35.py`; nothing downloaded), bf16, the `sd35_ocr` preset's sampling (512 px, 10
steps, CFG 4.5, batches of 16, G = 16) and training (LoRA rank 64 with the adapter-disabled reference and its KL
term, ZeRO-2, 2 groups = 32 images per step), each against the plain alternative in the same run:
- rollouts: images/s of `gdro rollouts` (whole command and its shards) against diffusers'
  `StableDiffusion3Pipeline` called in a loop on the same weights, steps, CFG and batch; peak device memory;
- training, gradient checkpointing on and off: median step time and peak memory of `gdro train` against a bare
  PyTorch step of the same maths (reference forward with the adapter disabled, policy forward, the velocity
  errors and KL, backward, AdamW on the adapter) on the same model and batch;
- achieved TFLOP/s from the transformer's FLOPs as `torch.utils.flop_counter` counts them (one forward for
  sampling; one bare step on two images, scaled to the batch, for training; recomputation by checkpointing is
  not counted), and its share of the device's dense bf16 peak.
The reward is `timed` at no cost (the rows measure gdro, not a scorer). `--reduced` runs the same at reduced
depth and width on whatever device there is: the CPU smoke run of the tests, whose figures mean nothing.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.errors import GdroError

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device-name substring;
# the first match wins, so the specific names come first. `--peak-tflops` overrides.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0))
WORDS = ["hello", "open late", "exit", "welcome home", "cafe", "no parking", "sale", "bakery"]


@dataclasses.dataclass(frozen=True)
class Size:
    prompts: int  # x group images, in shards of prompts_per_shard prompts
    group: int
    prompts_per_shard: int
    batch: int
    resolution: int
    steps: int
    guidance: float
    max_len: int  # T5 tokens
    train_steps: int  # per trainer run; the first `warmup` left out
    warmup: int
    bare_steps: int


FULL = Size(prompts=8, group=16, prompts_per_shard=4, batch=16, resolution=512, steps=10, guidance=4.5, max_len=128,
            train_steps=8, warmup=3, bare_steps=5)
REDUCED = Size(prompts=4, group=4, prompts_per_shard=2, batch=8, resolution=64, steps=2, guidance=4.5, max_len=16,
               train_steps=3, warmup=1, bare_steps=2)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _cfg(model: Path, tmp: Path, size: Size, dtype: str, **train):
    from pipeline.config import ExperimentConfig, resolve

    sets = [f"model.path={model}", f"model.dtype={dtype}", f"model.resolution={size.resolution}",
            f"model.max_sequence_length={size.max_len}", f"sampler.steps={size.steps}",
            f"sampler.guidance={size.guidance}", f"rollouts.prompts={tmp / 'prompts.txt'}",
            f"rollouts.out={tmp / 'dataset'}", "rollouts.num_prompts=0", f"rollouts.group_size={size.group}",
            f"rollouts.prompts_per_shard={size.prompts_per_shard}", f"rollouts.batch_size={size.batch}",
            "rollouts.ref_cache_k=0", 'rollouts.rewards={"timed": {"seconds_per_image": 0.0}}',
            f"train.dataset={tmp / 'dataset'}", 'train.reward_weights={"timed": 1.0}', "train.eval_every=0",
            f"train.steps={size.train_steps}", f"train.save_every={size.train_steps}", "train.num_workers=0"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return resolve(ExperimentConfig, preset="sd35_ocr", overrides=sets)


def _forward_flops(model_cfg: dict, size: Size, images: int) -> float:
    """FLOPs of one transformer forward on `images` latents with CLIP's 77 + T5's tokens, counted on the meta
    device (no memory, no time)."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = SD3Transformer2DModel.from_config(model_cfg)
        lat = size.resolution // 8
        x = torch.empty(images, model_cfg["in_channels"], lat, lat)
        text = torch.empty(images, 77 + size.max_len, model_cfg["joint_attention_dim"])
        pooled = torch.empty(images, model_cfg["pooled_projection_dim"])
        t = torch.empty(images)
        with FlopCounterMode(display=False) as fc:
            m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False)
    return float(fc.get_total_flops())


def bench_rollouts(model: Path, tmp: Path, size: Size, dtype: str, device: torch.device, flops_per_image: float,
                   peak: float | None) -> list[dict]:
    from diffusers import StableDiffusion3Pipeline

    from schemas.records import ShardStats
    from stages.rollouts import main as rollouts

    images = size.prompts * size.group
    prompts = (tmp / "prompts.txt").read_text().splitlines()
    flat = [p for p in prompts for _ in range(size.group)]
    _free(device)
    w = time.perf_counter()
    rollouts(_cfg(model, tmp, size, dtype))
    ours = time.perf_counter() - w
    ours_mem = _peak_gb(device)
    shards = sum(ShardStats.load(p).seconds for p in (tmp / "dataset" / "shards").glob("*.stats.json"))
    _free(device)
    w = time.perf_counter()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch_dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    gen = torch.Generator(device).manual_seed(0)
    for s in range(0, images, size.batch):
        pipe(flat[s:s + size.batch], num_inference_steps=size.steps, guidance_scale=size.guidance,
             height=size.resolution, width=size.resolution, max_sequence_length=size.max_len, generator=gen,
             output_type="np")
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    plain_mem = _peak_gb(device)
    del pipe
    _free(device)
    label = (f"{size.prompts} prompts x G={size.group}, {size.resolution} px, {size.steps} steps, CFG "
             f"{size.guidance:g}, batch {size.batch}")
    sampling_flops = images * size.steps * 2 * flops_per_image  # CFG: two forwards per step
    achieved = sampling_flops / shards / 1e12
    return [
        {"name": f"rollouts, images/s ({label})", "ours": images / ours, "plain": images / (end - w),
         "ours_label": "`gdro rollouts` whole command incl. start-up, weight hashing, writing",
         "plain_label": "StableDiffusion3Pipeline loop incl. from_pretrained"},
        {"name": "rollouts per shard, images/s", "ours": images / shards, "plain": images / (end - loaded),
         "ours_label": "`gdro rollouts` shards (sum of stats seconds)",
         "plain_label": "StableDiffusion3Pipeline loop, images only"},
        _memory_row("rollouts peak device memory, GiB", ours_mem, plain_mem, "`gdro rollouts`",
                    "StableDiffusion3Pipeline loop"),
        {"name": "rollouts achieved TFLOP/s (transformer, in the shards)",
         "text": f"{achieved:.3g}" + (f" ({100 * achieved / peak:.0f} % of the {peak:g} bf16 peak)" if peak else "")},
    ]


def _memory_row(name, ours, plain, ours_label, plain_label) -> dict:
    if ours is None or plain is None:
        return {"name": name, "text": "not measured on a CPU"}
    return {"name": name, "ours": ours, "plain": plain, "ours_label": ours_label, "plain_label": plain_label}


def _bare_step(cfg, batch, velocity, device: torch.device, dtype: torch.dtype):
    """Plain PyTorch, the trainer's maths without the trainer: the same transformer with the same LoRA adapter
    and checkpointing, the reference forward with the adapter disabled, the policy forward, the velocity errors'
    difference plus the KL term, backward, torch AdamW on the adapter. No DeepSpeed, data loading or logging."""
    from pipeline.adapters import add_lora
    from pipeline.backends.base import load_transformer
    from pipeline.flow import flow_errors
    from pipeline.losses import kl_penalty

    t = cfg.train
    model = load_transformer(cfg.model.backend, cfg.model.path, dtype).to(device)
    params = add_lora(model, t)
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def step(n: int | None = None):  # n: the first n images only (the FLOP count)
        x0, eps, tt, cond = batch
        if n is not None:
            x0, eps, tt, cond = x0[:n], eps[:n], tt[:n], cond[:n]
        v = lambda x, t_, c: velocity(model, x, t_, c)
        with torch.no_grad():
            model.disable_adapters()
            ref, v_ref = flow_errors(v, x0, eps, tt, cond, return_velocity=True)
            model.enable_adapters()
        err, v_pol = flow_errors(v, x0, eps, tt, cond, return_velocity=True)
        loss = (err.float() - ref.float()).mean() + t.kl_beta * kl_penalty(v_pol, v_ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, step


def _batch(cfg, device, dtype):
    from stages.bench import _training_batch

    (x0, eps, tt, cond), velocity, _ = _training_batch(cfg)
    return (x0.to(device, dtype), eps.to(device, dtype), tt.to(device), cond.to(device, dtype)), velocity


def bench_training(model: Path, tmp: Path, size: Size, dtype: str, device: torch.device,
                   peak: float | None) -> list[dict]:
    from stages.bench import _run_trainer

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    rows, step_flops = [], None
    for ckpt in (True, False):
        cfg = _cfg(model, tmp, size, dtype, gradient_checkpointing=str(ckpt).lower(), out=tmp / f"run-{ckpt}")
        label = f"gradient checkpointing {'on' if ckpt else 'off'}"
        env = dict(os.environ)
        try:
            _free(device)
            batch, velocity = _batch(cfg, device, torch_dtype)
            bare_model, bare = _bare_step(cfg, batch, velocity, device, torch_dtype)
            if step_flops is None:  # one counted step on 2 images, scaled: FLOPs are linear in the batch
                from torch.utils.flop_counter import FlopCounterMode

                bare_model.disable_gradient_checkpointing()
                with FlopCounterMode(display=False) as fc:
                    bare(2)
                step_flops = fc.get_total_flops() * len(batch[0]) / 2
                if ckpt:
                    bare_model.enable_gradient_checkpointing()
            bare()  # warm-up
            _free(device)
            times = []
            for _ in range(size.bare_steps):
                w = time.perf_counter()
                bare()
                times.append(time.perf_counter() - w)
            bare_s, bare_mem = statistics.median(times), _peak_gb(device)
            del bare_model, bare
            _free(device)
            records, _ = _run_trainer(cfg)
            ours_s = statistics.median(r["step_s"] for r in records[size.warmup:])
            ours_mem = _peak_gb(device)
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"name": f"training, {label}", "text": f"out of device memory ({str(e).splitlines()[0]})"})
            continue
        finally:
            os.environ.clear()
            os.environ.update(env)
            _free(device)
        n_img = len(batch[0])
        rows.append({"name": f"training step time, s ({cfg.train.groups_per_step} groups, {n_img} images, LoRA "
                             f"r={cfg.train.lora_rank}, ZeRO-{cfg.train.zero_stage}, {label})",
                     "ours": ours_s, "plain": bare_s,
                     "ours_label": f"`gdro train`, median step_s after {size.warmup} warm-up steps",
                     "plain_label": "bare PyTorch: same model, LoRA, reference and KL, fwd + bwd + AdamW"})
        rows.append(_memory_row(f"training peak device memory, GiB ({label})", ours_mem, bare_mem, "`gdro train`",
                                "bare PyTorch step"))
        achieved = step_flops / ours_s / 1e12
        rows.append({"name": f"training achieved TFLOP/s ({label})",
                     "text": f"{achieved:.3g} (`gdro train`; bare {step_flops / bare_s / 1e12:.3g})"
                     + (f", {100 * achieved / peak:.0f} % of the {peak:g} bf16 peak" if peak else "")})
    return rows


def device_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def main(*, reduced: bool = False, out: Path = Path("bench/out"), peak_tflops: float | None = None,
         work: Path | None = None) -> Path:
    """Writes OUT/full_size.md (or full_size_reduced.md) and .json; `work`: where the model folder, dataset and
    runs go (a temporary folder inside it; the full model takes 5 GB)."""
    from pipeline.backends.random_sd35 import build_random_sd35_medium, sd35_medium_configs

    cuda = torch.cuda.is_available()
    if not cuda and not reduced:
        raise GdroError("gdro bench --full-size needs a CUDA device and none is visible; run it on a GPU node "
                        "(make bench-gpu), or add --reduced for the small CPU run")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    size = REDUCED if reduced else FULL
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = peak_tflops or (device_peak(name) if cuda else None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        model = build_random_sd35_medium(tmp / "model", reduced=reduced, dtype=getattr(torch, dtype), device=device)
        built = time.perf_counter() - t0
        prompts = [f'a sign that says "{WORDS[i % len(WORDS)]}", photo {i}' for i in range(size.prompts)]
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
        per_image = _forward_flops(sd35_medium_configs(reduced)["transformer"], size, 1)
        rows = bench_rollouts(model, tmp, size, dtype, device, per_image, peak)
        rows += bench_training(model, tmp, size, dtype, device, peak)
    from stages.bench import table

    text = table(rows)
    head = (f"SD3.5-Medium {'at REDUCED depth and width (a smoke run: the figures mean nothing)' if reduced else ''}"
            f" with random weights on {name} ({dtype}, torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}" if cuda else "") + f"); model built in {built:.0f} s, the whole "
            f"benchmark {time.perf_counter() - t0:.0f} s. Time rows: ratio = ours / plain.")
    out.mkdir(parents=True, exist_ok=True)
    stem = "full_size_reduced" if reduced else "full_size"
    (out / f"{stem}.md").write_text(f"{head}\n\n{text}\n")
    (out / f"{stem}.json").write_text(json.dumps({"device": name, "dtype": dtype, "peak_tflops": peak,
                                                  "size": dataclasses.asdict(size), "rows": rows}, indent=1))
    print(text)
    return out / f"{stem}.md"
