"""Peak host memory of stage two's load, train step and export, on SD3- and FLUX-shaped transformers of two
sizes, so the cost per parameter can be read off and extrapolated (docs/memory.md).

Each phase runs in a fresh process (`python -m stages.bench_memory phase ...`): the process's peak resident
set (`VmHWM`) is reset just before the phase (Linux `/proc/self/clear_refs`) and read after it, minus the
resident set before it, so imports and the earlier phases do not count. On a CPU the train step's device
memory is host memory too. Weights are stored in bf16 on disk, as the released SD3.5 and FLUX files are.

    python -m stages.bench_memory [--out docs/memory.json]
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"small": 2, "large": 4}  # transformer layers; width fixed, so parameters scale with the layers
WIDTH = 384  # attention_head_dim x heads
PHASES = ("load", "step", "export")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakRSS:
    """Peak resident set growth over a `with` block: VmHWM is reset to the current RSS on entry."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") - self.before


def build_model(folder: Path, kind: str, layers: int) -> Path:
    """A tiny random SD3/FLUX pipeline folder whose transformer is replaced by a wider one of `layers` blocks,
    stored in bf16."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from pipeline.backends.tiny import build_tiny_flux, build_tiny_sd3

    (build_tiny_sd3 if kind == "sd3" else build_tiny_flux)(folder)
    torch.manual_seed(0)
    heads = WIDTH // 64
    if kind == "sd3":
        tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                   attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=32,
                                   caption_projection_dim=WIDTH, pooled_projection_dim=32, pos_embed_max_size=16)
    else:
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers // 2,
                                    num_single_layers=layers - layers // 2, attention_head_dim=64,
                                    num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16,
                                    guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    tr.to(torch.bfloat16).save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def _config(kind: str, model: Path, out: Path, lora: bool):
    from pipeline.config import ExperimentConfig, resolve

    over = [f"model.backend={kind}", f"model.path={model}", f"train.out={out}", "train.precision=bf16",
            "train.groups_per_step=1"]
    return resolve(ExperimentConfig, overrides=over + (["train.lora_rank=16"] if lora else []))


def run_phase(kind: str, model: Path, phase: str, lora: bool) -> dict:
    """In this process: the phases up to `phase`, measuring only the last."""
    import deepspeed
    import torch

    from pipeline.backends.base import Conditioning, latent_shape_of, load_transformer, velocity_fn
    from pipeline.distributed import init_distributed
    from pipeline.runs import export
    from pipeline.adapters import trainable
    from stages.train import ds_config

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    init_distributed()
    cfg = _config(kind, model, work / "run", lora)
    load_transformer(kind, str(model), torch.bfloat16)  # warm-up: lazy imports do not count as the load's
    gc.collect()
    with PeakRSS() as load:
        tr = load_transformer(kind, str(model), torch.bfloat16)
    n = sum(p.numel() for p in tr.parameters())
    result = {"kind": kind, "lora": lora, "phase": phase, "params": n, "load": load.peak}
    if phase == "load":
        return result
    with PeakRSS() as step:
        params = trainable(tr, cfg.train, lora)
        opt = torch.optim.AdamW(params, lr=1e-5)
        engine, *_ = deepspeed.initialize(model=tr, optimizer=opt, config=ds_config(cfg.train, 1, True))
        shape = latent_shape_of(kind, str(model), 32)
        x = torch.randn(2, *shape, dtype=torch.bfloat16)
        cond = Conditioning(torch.randn(2, 8, 32), torch.randn(2, 32 if kind == "sd3" else 16)).to(torch.bfloat16)
        v = velocity_fn(kind, guidance=3.5)(engine, x, torch.full((2,), 0.5), cond)
        engine.backward(v.float().pow(2).mean())
        engine.step()
    result["step"] = step.peak
    if phase == "step":
        return result
    with PeakRSS() as exp:
        export(engine, cfg, work / "export", lora=lora, rank=0)
    result["export"] = exp.peak
    result["export_bytes"] = sum(f.stat().st_size for f in (work / "export" / "transformer").glob("*.safetensors"))
    return result


def measure(kind: str, model: Path, phase: str, lora: bool = False) -> dict:
    """`run_phase` in a fresh process."""
    # a fixed mmap threshold: glibc returns every large block to the system when it is freed, so the resident
    # set follows the tensors alive (with its default, a freed block may be reused unseen or kept resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "stages.bench_memory", "phase", kind, str(model), phase,
                          str(int(lora))], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(out: Path | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sd3", "flux"):
            for size, layers in SIZES.items():
                model = build_model(Path(tmp) / f"{kind}-{size}", kind, layers)
                for lora in (False, True):
                    row = measure(kind, model, "export", lora) | {"size": size}
                    rows.append(row)
                    n = row["params"]
                    print(f"{kind} {size:5s} {'lora' if lora else 'full'} {n / 1e6:6.1f} M params: "
                          + ", ".join(f"{p} {row[p] / n:5.2f} B/param" for p in PHASES), flush=True)
    if out is not None:
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["phase"]:
        kind, model, phase, lora = sys.argv[2:6]
        print(json.dumps(run_phase(kind, Path(model), phase, lora == "1")))
    else:
        main(Path(sys.argv[2]) if sys.argv[1:2] == ["--out"] else None)
