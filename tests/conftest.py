"""Shared fixtures: tiny random models built here (nothing downloaded), offline hub, few threads."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WDS_SECURE", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GDRO_TEST_THREADS", "1")))


def build_tiny_toy_model(path, seed: int = 0, denoiser: str = "sd3"):
    """A random toy backend, ~60k parameters: the SD3 transformer (the SD3 code path most tests exercise) or the
    UNet (the class of models/toy-base)."""
    from pipeline.backends.toy import TextEncoderConfig, ToyBackend, ToyTextEncoder, build_transformer, build_unet

    torch.manual_seed(seed)
    text = ToyTextEncoder(TextEncoderConfig(dim=32, pooled_dim=32, layers=1, heads=2))
    if denoiser == "unet":
        tr = build_unet(text_dim=32, pooled_dim=32, channels=(8, 16, 32), head_dim=8)
    else:
        tr = build_transformer(text_dim=32, pooled_dim=32, layers=1, heads=2, head_dim=16)
    ToyBackend(tr, text).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_toy_model(tmp_path_factory):
    return build_tiny_toy_model(tmp_path_factory.mktemp("tiny_toy_model"))


@pytest.fixture(scope="session")
def tiny_toy_unet(tmp_path_factory):
    return build_tiny_toy_model(tmp_path_factory.mktemp("tiny_toy_unet"), denoiser="unet")
