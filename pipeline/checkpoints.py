"""The weights of a training run's models, for evaluation (which models a run holds: `pipeline/runs.py`).

A DeepSpeed checkpoint `<run>/checkpoints/step_XXXXXXX/` is read in place, so evaluating every saved step costs
no extra disk and no extra work in training (`train.keep_checkpoints` decides how many points a curve has).
Under ZeRO-1/2, `mp_rank_00_model_states.pt` holds every weight of the module; it is read with
`torch.load(weights_only=True)` (no pickle code runs). Under ZeRO-3 the weights are partitioned across the
optimiser files, which only DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` reassembles; it
unpickles them, the same trust as resuming the run (`engine.load_checkpoint` does the same). LoRA checkpoints
hold only the adapter (the frozen base is the run's `model.path`); they are merged (W + alpha / r * B A) into a
plain transformer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .ema import averaged
from .errors import GdroError
from .model_folder import merge_lora
from .runs import MODEL_STATES, ModelRef


def deepspeed_state_dict(tag_dir: Path, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain float32 transformer weights of one DeepSpeed checkpoint written by `gdro train` (the EMA of the
    weights when the run kept one; LoRA merged onto `base`, by default the run's model.path transformer)."""
    tag_dir = Path(tag_dir)
    states_file = tag_dir / MODEL_STATES
    if not states_file.is_file():
        raise GdroError(f"{tag_dir} lacks {MODEL_STATES}: not a complete DeepSpeed checkpoint")
    states = torch.load(states_file, map_location="cpu", weights_only=True)
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        state = states["module"]
    if states.get("ema"):  # trained with train.ema_decay: the averaged weights are the model
        state = averaged(state, states["ema"])
    train = (states.get("config") or {}).get("train", {})
    rank = int(train.get("lora_rank", 0))
    if rank:
        if base is None:
            from .backends.base import load_transformer

            model = states["config"]["model"]
            base = load_transformer(model["backend"], model["path"]).state_dict()
        state = merge_lora(state, float(train.get("lora_alpha") or rank) / rank, base)
    return {k: v.float() for k, v in state.items()}


def load_model(ref: ModelRef, cfg):
    """A sampling backend for `ref`, through the backend registry with everything `cfg` says about the model and
    the sampler (`backend_from_config`: backend, dtype, resolution, sequence length, guidance): a model folder as
    is; a DeepSpeed checkpoint as the base model (`model.path`: text encoders and VAE are frozen in training)
    with the checkpoint's transformer weights."""
    from .backends.base import backend_from_config

    if ref.kind == "folder":
        return backend_from_config(cfg, str(ref.path))
    backend = backend_from_config(cfg, cfg.model.path)
    state = deepspeed_state_dict(ref.path, base=backend.transformer.state_dict())
    backend.transformer.load_state_dict(state, strict=True)  # copied into its dtype/device
    return backend
