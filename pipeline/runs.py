"""The run folder of `gdro train` (`train.out`), as `schemas/layout.py` is the dataset's: its names, and all that
writes or reads them.

    <run>/config.json                 the resolved configuration
          metrics.jsonl               one line per step (trimmed to the checkpoint a resumed run restarts from)
          tensorboard/
          checkpoints/step_NNNNNNN/   DeepSpeed checkpoints (the newest train.keep_checkpoints kept)
          checkpoints/latest          the newest complete tag, moved only once every rank has saved it
          export/                     the final model folder (+ lora/ for LoRA runs, gdro_export.json)
          best/                       the model kept by corrected score (train.eval_every; + best.json)
          selection.jsonl             one line per evaluation during training
          slurm/, eval/               written by `gdro submit` (pipeline/slurm.py) and `gdro eval`
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from schemas import layout

from .adapters import lora_scale
from .errors import GdroError
from .model_folder import export_dtype, host_weights, write_model_folder

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
EXPORT = "export"
EXPORT_INFO = "gdro_export.json"
ADAPTER = "lora"  # <run>/export/lora: the adapter alone, in diffusers' LoRA format
BEST = "best"
BEST_INFO = "best.json"
SELECTION = "selection.jsonl"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the module's weights in a tag folder


# ------------------------------------------------------------------------------------------------ names
def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(tag_dir: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", Path(tag_dir).name)
    if not m:
        raise GdroError(f"{tag_dir} is not a checkpoint folder named step_NNNNNNN")
    return int(m.group(1))


def latest_tag(run: Path) -> str | None:
    """The tag a resumed run restarts from; None when the run has no checkpoint."""
    latest = Path(run) / CHECKPOINTS / LATEST
    return latest.read_text().strip() if latest.exists() else None


# ------------------------------------------------------------------------------------------------ logs
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line still being written (not valid JSON) is skipped."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    return records


def trim_jsonl(path: Path, step: int) -> list[dict]:
    """Drop the lines past `step` (written by a run that died between checkpoints); the records kept."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    layout.atomic_write(path, "".join(line + "\n" for line in lines).encode())
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------------------------------------ writing
def save_checkpoint(engine, cfg, ckdir: Path, step: int, rank: int, ema=None) -> None:
    """All ranks save through DeepSpeed; `latest` moves only once every rank's files of the tag are written.

    DeepSpeed's own `latest` is written by rank 0 before its final barrier, so a rank killed mid-save could leave
    `latest` naming an incomplete tag; here it is written after a barrier, atomically (temporary file, rename)."""
    import torch.distributed as dist

    from .config import to_dict

    tag = checkpoint_tag(step)
    client = {"step": step, "config": to_dict(cfg), **({"ema": ema.state_dict()} if ema is not None else {})}
    # LoRA: only the trainable weights (and the optimiser's state of them); the frozen base is model.path's
    engine.save_checkpoint(str(ckdir), tag=tag, client_state=client, save_latest=False,
                           exclude_frozen_parameters=cfg.train.lora_rank > 0)
    dist.barrier()
    if rank == 0:
        layout.atomic_write(ckdir / LATEST, tag.encode())
        prune(ckdir, cfg.train.keep_checkpoints)
    dist.barrier()


def prune(ckdir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoint tags."""
    tags = sorted(p for p in Path(ckdir).glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def export(engine, cfg, folder: Path, *, lora: bool, rank: int, ema=None) -> Path | None:
    """A model folder diffusers loads: the full transformer (`from_pretrained`; LoRA merged) plus, for LoRA,
    the adapter alone in diffusers' format (`load_lora_weights`); the averaged weights when `ema` is given;
    in `train.export_dtype` (default: the training precision). The weights go to the host one tensor at a
    time and are merged there: no copy of the model on the device, no second model on the host."""
    import diffusers
    import torch.distributed as dist

    from .backends.base import spec_of
    from .config import to_dict
    from .distributed import print0

    module = engine.module
    t = cfg.train
    state = engine._zero3_consolidated_16bit_state_dict() if t.zero_stage == 3 else None
    if rank != 0:
        dist.barrier()
        return None
    dtype = export_dtype(t, module)
    weights = host_weights(module.state_dict() if state is None else state, ema=ema)
    save_adapter = None
    if lora:
        from peft.utils import get_peft_model_state_dict

        adapter = {k: v.to(dtype) for k, v in weights.items() if ".lora_" in k}
        pipeline_cls = getattr(diffusers, spec_of(cfg.model.backend).lora_pipeline)  # the backend's LoRA format

        def save_adapter(tmp: Path) -> None:
            # the adapter's config (rank, alpha, targets) goes with it: without it diffusers loads alpha as the rank
            pipeline_cls.save_lora_weights(
                str(tmp / ADAPTER), transformer_lora_layers=get_peft_model_state_dict(module, state_dict=adapter),
                transformer_lora_adapter_metadata=module.peft_config["default"].to_dict(), safe_serialization=True)

    weights = host_weights(weights, lora_scale=lora_scale(t) if lora else 0.0, dtype=dtype)
    info = json.dumps({"base_model": str(cfg.model.path), "train": to_dict(t)}, indent=1)
    write_model_folder(folder, weights, config_from=module, base=cfg.model.path, files={EXPORT_INFO: info},
                       extra=save_adapter)
    dist.barrier()
    print0(f"train: exported {folder}")
    return folder


def save_best(run: Path, state, *, config_from, base: str, info: dict) -> Path:
    """<run>/best: the model folder of `state` (plain weights) with `info` (step, scores) in best.json."""
    return write_model_folder(Path(run) / BEST, state, config_from=config_from, base=base,
                              files={BEST_INFO: json.dumps(info, indent=1) + "\n"})


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class ModelRef:
    label: str  # "reference", "step 200", "best (step 150)", or a folder name
    step: int | None  # training step (0 for the reference); None when unknown
    path: Path
    kind: str  # "folder" (a model folder diffusers loads) | "deepspeed" (a DeepSpeed tag folder)


def run_models(run: Path, which: str = "all") -> list[ModelRef]:
    """The trained models of a run, by step. `all`: every DeepSpeed checkpoint still on disk, plus `best/` when
    its step is not among them; the export when there is no checkpoint. `export`: only `<run>/export`."""
    run = Path(run)
    export_dir = run / EXPORT
    if which == "export":
        if not export_dir.is_dir():
            raise GdroError(f"{export_dir} does not exist; run `gdro train` first or set eval.checkpoint")
        return [ModelRef("export", export_step(run), export_dir, "folder")]
    refs = [ModelRef(f"step {checkpoint_step(p)}", checkpoint_step(p), p, "deepspeed")
            for p in sorted((run / CHECKPOINTS).glob("step_*")) if (p / MODEL_STATES).is_file()]
    best = run / BEST
    if (best / BEST_INFO).is_file():
        step = int(json.loads((best / BEST_INFO).read_text())["step"])
        if step not in {r.step for r in refs}:
            refs.append(ModelRef(f"best (step {step})", step, best, "folder"))
    if not refs and export_dir.is_dir():
        refs.append(ModelRef("export", export_step(run), export_dir, "folder"))
    if not refs:
        raise GdroError(f"{run} holds no checkpoint (checkpoints/step_*), best/ or export/ to evaluate; run "
                        f"`gdro train` first or set eval.checkpoint to a model folder")
    return sorted(refs, key=lambda r: (r.step is None, r.step or 0))


def export_step(run: Path) -> int | None:
    """The step the export was made at: the last line of metrics.jsonl."""
    metrics = Path(run) / METRICS
    if metrics.is_file():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            return int(json.loads(lines[-1])["step"])
    return None


def progress(run: Path, steps: int) -> str:
    """One line for `gdro status`: the last step and loss, the latest checkpoint, whether it is exported."""
    run = Path(run)
    records = read_jsonl(run / METRICS)
    last = records[-1] if records else None
    tag = latest_tag(run)
    text = f"step {last['step']}/{steps}, loss {last['loss']:.4g}" if last else f"step 0/{steps}"
    text += f"; checkpoint {tag}" if tag is not None else "; no checkpoint yet"
    return text + ("; exported" if (run / EXPORT).is_dir() else "")
