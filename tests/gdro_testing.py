"""Helpers shared by test modules (importable as `gdro_testing`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch


def run_train(cfg, **kwargs) -> Path:
    """stages.train.main in-process, leaving the test process as it found it (signal handlers, environment)."""
    from stages.train import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        return main(cfg, **kwargs)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer weights of a model folder (an export, or a base model)."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))
