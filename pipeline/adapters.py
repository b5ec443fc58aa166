"""The LoRA adapter a run trains (train.lora_rank, lora_alpha, lora_targets), for every trainer that trains one:
`gdro train`, the toy world's ground-truth ceiling and the online baselines, so that a comparison between them
trains the same parameters."""
from __future__ import annotations

import torch

from .config import TrainConfig
from .model_folder import merge_lora


def lora_scale(t: TrainConfig) -> float:
    """alpha / r of train.lora_alpha (0: the rank) and lora_rank; 0 without LoRA."""
    return (t.lora_alpha or t.lora_rank) / t.lora_rank if t.lora_rank else 0.0


def lora_config(t: TrainConfig):
    """peft's LoraConfig of train.lora_rank, lora_alpha (0: the rank) and lora_targets."""
    from peft import LoraConfig

    return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha or t.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(t.lora_targets))


def add_lora(module: torch.nn.Module, t: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze `module` and add the run's adapter to it; returns the parameters left to train (the adapter's)."""
    module.requires_grad_(False)
    module.add_adapter(lora_config(t))
    return [p for p in module.parameters() if p.requires_grad]


def trainable(module: torch.nn.Module, t: TrainConfig, lora: bool) -> list[torch.nn.Parameter]:
    """The parameters a trainer optimises: the run's adapter (added here) with LoRA, else every trainable weight."""
    return add_lora(module, t) if lora else [p for p in module.parameters() if p.requires_grad]


def merged(adapted: torch.nn.Module, backend: str, base_path: str, t: TrainConfig) -> torch.nn.Module:
    """A fresh plain denoiser of the base (`backend`, `base_path`) holding `adapted`'s weights with its adapter
    merged (W + alpha / r B A): the model folder a LoRA run exports, loadable without peft."""
    from .backends.base import load_transformer

    plain = load_transformer(backend, base_path)
    plain.load_state_dict(merge_lora(adapted.state_dict(), lora_scale(t)))
    return plain
