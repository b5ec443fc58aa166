"""Recipe: evaluate a trained model against the reference on held-out prompts, with the same noise.

Both models sample every prompt line with the same seeds; the toy world scores them with the verifier
(strict accuracy per kind, GenEval's table) and the out-of-domain quality score. Results are printed and
written to <eval.out>/results.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backends.base import load_backend
from pipeline.config import ExperimentConfig, save_resolved
from pipeline.errors import GdroError
from pipeline.evaluation import sample_prompt_set
from pipeline.prompts import load_prompts
from pipeline.toy.scoring import format_table, kind_table, score_images


def evaluate_model(path: str, cfg: ExperimentConfig, metas: list[dict], label: str) -> dict:
    e = cfg.eval
    backend = load_backend(cfg.model.backend, path, dtype=getattr(torch, cfg.model.dtype))
    sampler = cfg.sampler
    with tqdm(total=len(metas) * e.seeds, desc=f"eval {label}", unit="img", dynamic_ncols=True) as bar:
        images = sample_prompt_set(backend, metas, sampler, base_seed=e.base_seed, seeds=e.seeds,
                                   batch=e.batch_size, progress=bar)
    rep = [m for m in metas for _ in range(e.seeds)]
    scores = score_images(images, rep)
    return {"images": images, "scores": scores, "table": kind_table(scores, [m["tag"] for m in rep])}


def main(cfg: ExperimentConfig) -> dict:
    e = cfg.eval
    if cfg.model.backend != "toy":
        raise GdroError("gdro eval scores the toy world's verifier; evaluation of real backends arrives with issue 6")
    checkpoint = e.checkpoint or str(Path(cfg.train.out) / "export")
    if not Path(checkpoint).is_dir():
        raise GdroError(f"eval.checkpoint: {checkpoint} does not exist; run `gdro train` first or set "
                        f"eval.checkpoint to a model folder")
    out = Path(e.out or Path(cfg.train.out) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.json")
    metas = load_prompts(e.prompts)
    metas = metas[: e.num_prompts] if e.num_prompts else metas
    ref = evaluate_model(cfg.model.path, cfg, metas, "reference")
    pol = evaluate_model(checkpoint, cfg, metas, "trained")
    wins = float(np.mean(pol["scores"]["partial"] > ref["scores"]["partial"]))
    ties = float(np.mean(pol["scores"]["partial"] == ref["scores"]["partial"]))
    for label, res in (("reference " + cfg.model.path, ref), ("trained " + checkpoint, pol)):
        print(f"\n{label}\n{format_table(res['table'])}")
    d = pol["table"]["strict"]["overall"] - ref["table"]["strict"]["overall"]
    print(f"\nstrict accuracy {ref['table']['strict']['overall']:.3f} -> {pol['table']['strict']['overall']:.3f} "
          f"({d:+.3f}); quality (out-of-domain) {ref['table']['quality']['overall']:.3f} -> "
          f"{pol['table']['quality']['overall']:.3f}; partial-credit win rate {wins:.2f} (ties {ties:.2f})")
    result = {"reference": {"path": cfg.model.path, "table": ref["table"]},
              "trained": {"path": checkpoint, "table": pol["table"]},
              "win_rate": wins, "tie_rate": ties, "strict_gain": d, "prompts": e.prompts, "images": len(metas) * e.seeds}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
