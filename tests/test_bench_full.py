"""The full-size benchmark (stages/bench_full.py): the published SD3.5-Medium configs build a model of the
published size, its FLOP count is linear in the batch (the training count relies on it), it refuses to start
without CUDA in one line, and its reduced CPU run goes through every row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def test_the_published_configs_build_sd35_mediums_size():
    """2.47 B transformer parameters with its position table (the model card's "2.5 billion"), 84 M in the VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from pipeline.backends.random_sd35 import sd35_medium_configs

    cfg = sd35_medium_configs()
    with torch.device("meta"):
        m = SD3Transformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderKL.from_config(cfg["vae"])
    total = sum(t.numel() for t in m.state_dict().values())
    assert total == pytest.approx(2.47e9, rel=0.01)
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(83.8e6, rel=0.01)
    assert len(m.transformer_blocks) == 24 and list(m.config.dual_attention_layers) == list(range(13))


def test_forward_flops_are_a_hand_count_and_linear_in_the_batch():
    """The counter's FLOPs of one forward at 512 px equal a count by hand: 2 x in x out per token for every
    linear layer over the tokens it sees (image stream 1,024, text stream 77 + 128, adaLN and embedders one),
    the patchifying convolution, and 4 x L^2 x width per attention (the joint one over both streams, the second
    one of the dual-attention blocks over the image); twice the images, twice the FLOPs (the training count
    scales a 2-image count to the batch)."""
    from diffusers import SD3Transformer2DModel

    from pipeline.backends.random_sd35 import sd35_medium_configs
    from stages.bench_full import FULL, _forward_flops

    cfg = sd35_medium_configs()["transformer"]
    with torch.device("meta"):
        m = SD3Transformer2DModel.from_config(cfg)
    img, txt = (FULL.resolution // 8 // 2) ** 2, 77 + FULL.max_len
    want = 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if "norm" in name or name.startswith("time_text_embed"):
                tokens = 1
            elif name == "context_embedder" or "add_" in name or "ff_context" in name:
                tokens = txt
            else:
                tokens = img
            want += 2 * mod.in_features * mod.out_features * tokens
        elif isinstance(mod, torch.nn.Conv2d):
            want += 2 * mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1] * img
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    want += cfg["num_layers"] * 4 * (img + txt) ** 2 * width + len(cfg["dual_attention_layers"]) * 4 * img ** 2 * width
    one = _forward_flops(cfg, FULL, 1)
    assert one == want  # 2.22 TFLOP
    assert _forward_flops(cfg, FULL, 2) == 2 * one


def test_full_size_refuses_without_cuda_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--full-size", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdro: error:") and "CUDA" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_reduced_run_goes_through_every_row(tmp_path, monkeypatch):
    """The CPU smoke run: the same builder, `gdro rollouts` vs. diffusers, both trainer runs vs. the bare step."""
    from stages.bench_full import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = main(reduced=True, out=tmp_path, work=tmp_path)
    rows = json.loads((tmp_path / "full_size_reduced.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert sum(n.startswith("training step time") for n in names) == 2  # checkpointing on and off
    timed = [r for r in rows if "ours" in r]
    assert len(timed) == 4 and all(r["ours"] > 0 and r["plain"] > 0 and r["ratio"] > 0 for r in timed)
    assert all("not measured on a CPU" in r["text"] for r in rows if "memory" in r["name"])
    text = path.read_text()
    assert "REDUCED" in text and text.count("\n| ") == len(rows) + 1  # a header and one line per row
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # the temporary model and runs are gone
