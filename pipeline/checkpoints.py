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
BEST = "best"  # <run>/best: the model kept by corrected score during training (pipeline/selection.py)
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
    """A peft state dict (base_layer, lora_A/lora_B per adapter) -> plain weights W + scale * B A, the sum in
    float32 and stored in W's dtype (peft's `merge` in float32). `base` (plain weights) supplies whatever
    `state` lacks: a LoRA checkpoint stores the adapter only. `state` is consumed entry by entry, so merging
    holds one extra weight at a time, not a second model."""
    if not any(".lora_A." in k for k in state):
        return state
    lora = {k: state.pop(k) for k in [k for k in state if ".lora_" in k]}
    out = dict(base or {})
    for k in list(state):
        out[k.replace(".base_layer.", ".")] = state.pop(k)
    for key, a in lora.items():
        m = _LORA_A.match(key)
        if m:
            prefix, adapter = m.groups()
            b = lora[f"{prefix}.lora_B.{adapter}.weight"]
            w = f"{prefix}.weight"
            out[w] = (out[w].float() + scale * (b.float() @ a.float())).to(out[w].dtype)
    return out


def host_weights(state: dict[str, torch.Tensor], *, ema=None, lora_scale: float = 0.0,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Plain transformer weights on the host from a module's (or ZeRO-3's gathered) state dict, copied to the
    host one tensor at a time in their own dtype (never a copy of the whole model on the device); `ema`'s
    float32 averages in place of the trained entries; LoRA merged with `lora_scale`; floating tensors cast to
    `dtype` one by one (None: as they are). The host holds about one model in the final dtype."""
    out = {k: v.detach().cpu() for k, v in state.items()}
    if ema is not None:
        out.update(ema.state_dict())
    if lora_scale:
        out = merge_lora(out, lora_scale)
    if dtype is not None:
        for k, v in out.items():
            if v.is_floating_point():
                out[k] = v.to(dtype)
    return out


def export_dtype(train, module) -> torch.dtype:
    """`train.export_dtype` as a torch dtype; auto: the training precision, i.e. the dtype of the module's
    parameters (DeepSpeed casts them to bf16 in a bf16 run)."""
    if train.export_dtype != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[train.export_dtype]
    module = getattr(module, "module", module)
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def write_transformer(folder: Path, state: dict[str, torch.Tensor], config_from) -> None:
    """`state` in the layout of diffusers' `save_pretrained` (config.json, safetensors in 10 GB shards, the index
    when sharded), without building a model: `config_from` is any model of the class (its `save_config`)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    getattr(config_from, "module", config_from).save_config(folder)
    split = split_torch_state_dict_into_shards(state, max_shard_size="10GB",
                                               filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_model_folder(folder: Path, state: dict[str, torch.Tensor], *, config_from, base: str | Path,
                       files: dict[str, str], extra=None) -> Path:
    """A model folder diffusers loads: the transformer from `state`, everything else copied from the `base`
    model folder, `files` (name -> text) beside them, `extra(tmp)` writing anything more first (the LoRA
    adapter). Written under a temporary name and renamed, so `folder` is always complete or absent."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if extra is not None:
        extra(tmp)
    write_transformer(tmp / "transformer", state, config_from)
    for item in Path(base).iterdir():  # everything but the transformer comes from the base model folder
        if item.name != "transformer" and not (tmp / item.name).exists():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    for name, text in files.items():
        (tmp / name).write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


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
