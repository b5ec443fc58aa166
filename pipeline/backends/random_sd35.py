"""An SD3.5-Medium pipeline folder with random weights: the published transformer and VAE configs
(`configs/sd35_medium.json`, from the model card's repository), small random text encoders (their cost is once
per prompt, so the benchmark loses nothing by them), nothing downloaded. `reduced=True` shrinks depth and width
(the file's "reduced" overrides) so a CPU runs the same classes and code path in seconds.

Weights are drawn on `device` (a GPU draws 2.5 B parameters in a second, a CPU takes minutes) and saved in
`dtype` with `save_pretrained`, so `gdro rollouts`, `gdro train` and diffusers' own pipeline load the folder as
they load the real one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = Path(__file__).with_name("configs") / "sd35_medium.json"


def sd35_medium_configs(reduced: bool = False) -> dict:
    """{"transformer": ..., "vae": ..., "scheduler": ...}: the published configs, or their reduced variant."""
    spec = json.loads(CONFIG.read_text())
    out = {k: dict(spec[k]) for k in ("transformer", "vae", "scheduler")}
    if reduced:
        for k, over in spec["reduced"].items():
            if k in out:
                out[k].update(over)
    return out


def build_random_sd35_medium(path: str | Path, *, reduced: bool = False, dtype: torch.dtype = torch.bfloat16,
                             device: str | torch.device = "cpu", seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from .tiny import _clip_encoder, _t5_encoder, _tokenizers

    path = Path(path)
    cfg = sd35_medium_configs(reduced)
    joint, pooled = cfg["transformer"]["joint_attention_dim"], cfg["transformer"]["pooled_projection_dim"]
    tokenizers, clip_vocab, t5_vocab = _tokenizers(("tokenizer", "tokenizer_2"), "tokenizer_3")
    # the real CLIP-L / bigG project to 768 + 1280 = 2048 (pooled); T5's width must be the joint dimension
    proj1 = pooled * 3 // 8
    te1, te2 = _clip_encoder(clip_vocab, seed + 1, proj=proj1), _clip_encoder(clip_vocab, seed + 2, proj=pooled - proj1)
    te3 = _t5_encoder(t5_vocab, joint, seed + 3)
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel.from_config(cfg["transformer"]).to(dtype).eval()
        vae = AutoencoderKL.from_config(cfg["vae"]).to(dtype).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        text_encoder=te1.to(dtype), text_encoder_2=te2.to(dtype), text_encoder_3=te3.to(dtype), **tokenizers)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
