"""Shared fixtures: tiny random models built here (nothing downloaded), offline hub, few threads."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WDS_SECURE", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GDRO_TEST_THREADS", "1")))


def build_tiny_toy_model(path, seed: int = 0):
    """A random toy backend (same classes and files as models/toy-base, ~60k parameters)."""
    from pipeline.backends.toy import TextEncoderConfig, ToyBackend, ToyTextEncoder, build_transformer

    torch.manual_seed(seed)
    text = ToyTextEncoder(TextEncoderConfig(dim=32, pooled_dim=32, layers=1, heads=2))
    tr = build_transformer(text_dim=32, pooled_dim=32, layers=1, heads=2, head_dim=16)
    ToyBackend(tr, text).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_toy_model(tmp_path_factory):
    return build_tiny_toy_model(tmp_path_factory.mktemp("tiny_toy_model"))
