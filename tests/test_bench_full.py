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


def test_forward_flops_are_linear_in_the_batch_and_near_the_parameter_count():
    """At 512 px: 1024 image + 205 text tokens through 2.24 B parameters -> about 2 x N x tokens FLOPs (plus
    attention); twice the images, twice the FLOPs."""
    from pipeline.backends.random_sd35 import sd35_medium_configs
    from stages.bench_full import FULL, _forward_flops

    cfg = sd35_medium_configs()["transformer"]
    one, two = _forward_flops(cfg, FULL, 1), _forward_flops(cfg, FULL, 2)
    assert two == pytest.approx(2 * one, rel=1e-9)
    matmul_bound = 2 * 2.24e9 * (1024 + 205)  # every parameter once per token: an upper bound of the matmuls
    assert 0.6 * matmul_bound < one < 1.3 * matmul_bound, one / matmul_bound


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
