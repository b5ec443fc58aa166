"""Model folders and the weights that go in them: the one LoRA merge and the one writer of a folder diffusers
loads (`<run>/export`, `<run>/best`).

The weights reach the host one tensor at a time (`host_weights`), the adapter is merged on the state dict
(`merge_lora`, one extra weight at a time) and the transformer is written in `save_pretrained`'s layout
without building a model (`write_transformer`): at no point is there a second copy of the model, on the
device or on the host (docs/memory.md).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

_LORA_A = re.compile(r"^(.*)\.lora_A\.([^.]+)\.weight$")


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
            # a Linear's A [r, in], B [out, r]; a Conv2d's A [r, in, kh, kw], B [out, r, 1, 1] (peft's layout):
            # delta[o, i, ...] = sum_r B[o, r] A[r, i, ...] for both, in W's shape
            delta = (b.float().flatten(1) @ a.float().flatten(1)).view(out[w].shape)
            out[w] = (out[w].float() + scale * delta).to(out[w].dtype)
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
