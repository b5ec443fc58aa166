"""The models of a training run, for evaluation: its DeepSpeed checkpoints, its export, its best model.

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

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .ema import averaged
from .errors import GdroError

MODEL_STATES = "mp_rank_00_model_states.pt"
BEST = "best"  # <run>/best: the model kept by corrected score during training (pipeline/eval/selection.py)
_LORA_A = re.compile(r"^(.*)\.lora_A\.([^.]+)\.weight$")


@dataclass
class ModelRef:
    label: str  # "reference", "step 200", "best (step 150)", or a folder name
    step: int | None  # training step (0 for the reference); None when unknown
    path: Path
    kind: str  # "folder" (a model folder diffusers loads) | "deepspeed" (a DeepSpeed tag folder)


def checkpoint_step(tag_dir: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", tag_dir.name)
    if not m:
        raise GdroError(f"{tag_dir} is not a checkpoint folder named step_NNNNNNN")
    return int(m.group(1))


def run_models(run: Path, which: str = "all") -> list[ModelRef]:
    """The trained models of a run, by step. `all`: every DeepSpeed checkpoint still on disk, plus `best/` when
    its step is not among them; the export when there is no checkpoint. `export`: only `<run>/export`."""
    run = Path(run)
    export = run / "export"
    if which == "export":
        if not export.is_dir():
            raise GdroError(f"{export} does not exist; run `gdro train` first or set eval.checkpoint")
        return [ModelRef("export", _export_step(run), export, "folder")]
    refs = [ModelRef(f"step {checkpoint_step(p)}", checkpoint_step(p), p, "deepspeed")
            for p in sorted((run / "checkpoints").glob("step_*")) if (p / MODEL_STATES).is_file()]
    best = run / BEST
    if (best / "best.json").is_file():
        step = int(json.loads((best / "best.json").read_text())["step"])
        if step not in {r.step for r in refs}:
            refs.append(ModelRef(f"best (step {step})", step, best, "folder"))
    if not refs and export.is_dir():
        refs.append(ModelRef("export", _export_step(run), export, "folder"))
    if not refs:
        raise GdroError(f"{run} holds no checkpoint (checkpoints/step_*), best/ or export/ to evaluate; run "
                        f"`gdro train` first or set eval.checkpoint to a model folder")
    return sorted(refs, key=lambda r: (r.step is None, r.step or 0))


def _export_step(run: Path) -> int | None:
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            return int(json.loads(lines[-1])["step"])
    return None


def merge_lora(state: dict[str, torch.Tensor], scale: float,
               base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A peft state dict (base_layer, lora_A/lora_B per adapter) -> plain weights W + scale * B A. `base` (plain
    weights) supplies whatever `state` lacks: a LoRA checkpoint stores the adapter only."""
    if not any(".lora_A." in k for k in state):
        return state
    out = dict(base or {})
    out.update({k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k})
    for key, a in state.items():
        m = _LORA_A.match(key)
        if m:
            prefix, adapter = m.groups()
            b = state[f"{prefix}.lora_B.{adapter}.weight"]
            w = f"{prefix}.weight"
            out[w] = (out[w].float() + scale * (b.float() @ a.float())).to(out[w].dtype)
    return out


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


def save_model_folder(state: dict[str, torch.Tensor], backend_name: str, base: str, folder: Path,
                      info: dict) -> Path:
    """A model folder diffusers loads (transformer weights from `state`, everything else copied from `base`),
    written beside `folder` under a temporary name and renamed; `info` goes to `best.json`."""
    from .backends.base import load_transformer

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_transformer(backend_name, base)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    for item in Path(base).iterdir():
        if item.name != "transformer":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    (tmp / "best.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
