"""Recipe: evaluate a run against its reference on held-out prompts, with the same noise for every model.

models (the reference, every checkpoint left in the run, the best model kept during training; or one folder,
eval.checkpoint; each loaded through the backend registry) -> sample every prompt line with the same seeds and
score every image (the target, the out-of-domain scores, every reward of eval.rewards, and the backend's verifier's
scores if it has one: the toy world's) -> summary (bootstrap intervals over prompts, win rates,
corrected score, hacking trend; pipeline/eval/report.py) -> a grid per checkpoint and curves over steps ->
<eval.out>/{results.json, report.md, report.html, curves.png, grid_*.png}. Deterministic: the same models and
config give the same numbers (fixed noise, fixed bootstrap seed, no timestamps in results.json).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.checkpoints import load_model
from pipeline.config import ExperimentConfig, save_resolved
from pipeline.errors import GdroError
from pipeline.eval.fixed_noise import eval_rewards, evaluate_backend, verifier_of
from pipeline.eval.grids import draw_comparison, pick_prompts
from pipeline.eval.report import dump_json, plot_curves, plot_selection, report_blocks, summarise, write_report
from pipeline.eval.tables import format_table
from pipeline.prompt_files import load_prompts
from pipeline.runs import SELECTION, ModelRef, run_models

SHORT = {"strict": "s", "partial": "p", "quality": "q"}


def short(name: str, world: str = "") -> str:
    """A cell label for a score: s, p, q, or the initials of a reward's name without its world's prefix (on the
    toy world, toy_color_area: ca)."""
    return SHORT.get(name) or "".join(w[0] for w in name.removeprefix(f"{world}_").split("_") if w)


def models_to_evaluate(cfg: ExperimentConfig) -> list[ModelRef]:
    """The reference first, then the trained models by step."""
    e = cfg.eval
    if e.checkpoint:
        if not Path(e.checkpoint).is_dir():
            raise GdroError(f"eval.checkpoint: {e.checkpoint} does not exist; set it to a model folder, or to '' "
                            f"to evaluate the checkpoints of train.out")
        trained = [ModelRef("/".join(Path(e.checkpoint).parts[-2:]), None, Path(e.checkpoint), "folder")]
    else:
        trained = run_models(Path(cfg.train.out), e.checkpoints)
    return [ModelRef("reference", 0, Path(cfg.model.path), "folder"), *trained]


def draw_grids(models: list[dict], metas: list[dict], cfg: ExperimentConfig, out: Path) -> tuple[list, str]:
    """A grid per trained model (reference row against its row) and one with every model, same noise per
    column (the first seed of each line). Frames: the backend's verifier's verdict (the toy world's), else none."""
    e = cfg.eval
    verifier = verifier_of(cfg.model.backend)
    passes = verifier.passes if verifier is not None else None
    picked = pick_prompts(metas, e.grid_per_kind)
    lines = [metas.index(m) for m in picked]
    shown = (["partial"] if e.target == "strict" else [e.target]) + e.out_of_domain[:1]
    legend = ", ".join(f"{short(n, cfg.model.backend)} = {n}" for n in shown)
    frame = verifier.frame_legend if verifier is not None else ""

    def row(mdl):
        imgs = np.stack([mdl["images"][i * e.seeds] for i in lines])
        text = [" ".join(f"{short(n, cfg.model.backend)} {mdl['scores'][n][i * e.seeds]:.2f}" for n in shown)
                for i in lines]
        return imgs, text

    sampler = f"{cfg.sampler.steps} steps, guidance {cfg.sampler.guidance:g}"
    grids = []
    rows = [row(m) for m in models]
    for k in range(1, len(models)):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", models[k]["label"]).strip("_")
        path = draw_comparison(np.stack([rows[0][0], rows[k][0]]), ["reference", models[k]["label"]], picked,
                               [rows[0][1], rows[k][1]], out / f"grid_{slug}.png",
                               f"{models[k]['label']} vs. reference, same noise per column ({sampler}); "
                               f"{frame}{legend}", passes=passes)
        grids.append((models[k]["label"], path.name))
    if len(models) > 2:
        path = draw_comparison(np.stack([r[0] for r in rows]), [m["label"] for m in models], picked,
                               [r[1] for r in rows], out / "grid_all.png",
                               f"every model, same noise per column ({sampler}); {frame}{legend}", passes=passes)
        grids.insert(0, ("all models", path.name))
    return grids, legend


def main(cfg: ExperimentConfig) -> dict:
    e = cfg.eval
    verifier = verifier_of(cfg.model.backend)  # the toy world's verifier; None for a real model
    rewards = eval_rewards(cfg)  # refuses a target the backend cannot score, before any model loads
    refs = models_to_evaluate(cfg)
    run = Path(cfg.train.out)
    out = Path(e.out or run / "eval")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.json")
    metas = load_prompts(e.prompts)
    metas = metas[: e.num_prompts] if e.num_prompts else metas

    # ---- sample and score every model on the same noise
    models = []
    for ref in refs:
        backend = load_model(ref, cfg)
        with tqdm(total=len(metas) * e.seeds, desc=f"eval {ref.label}", unit="img", dynamic_ncols=True) as bar:
            images, scores = evaluate_backend(backend, metas, cfg.sampler, base_seed=e.base_seed, seeds=e.seeds,
                                              batch=e.batch_size, rewards=rewards, verifier=verifier,
                                              progress=bar)
        models.append({"label": ref.label, "step": ref.step, "path": str(ref.path), "images": images,
                       "scores": scores})
        del backend

    # ---- numbers, pictures, page
    summary = summarise(models, [m["tag"] for m in metas], e.seeds, e)
    grids, legend = draw_grids(models, metas, cfg, out)
    title = f"{run if not e.checkpoint else e.checkpoint}: {len(metas)} lines of {e.prompts}"
    curves = plot_curves(summary, out / "curves.png", title)
    selection = run / SELECTION
    records = [json.loads(x) for x in selection.read_text().splitlines() if x.strip()] \
        if selection.is_file() and not e.checkpoint else []
    sel_png = plot_selection(records, out / "selection.png", e.target, e.out_of_domain)
    meta = {"run": str(run) if not e.checkpoint else e.checkpoint, "prompts": e.prompts, "base_seed": e.base_seed,
            "sampler": f"{cfg.sampler.scheduler}, {cfg.sampler.steps} steps, shift {cfg.sampler.shift:g}, "
                       f"guidance {cfg.sampler.guidance:g}"}
    figures = {"curves": curves.name if curves else None, "selection": sel_png.name if sel_png else None,
               "grids": grids, "legend": legend, "verdict_frames": verifier is not None}
    md, page = write_report(report_blocks(summary, meta, figures), out)
    result = {**meta, "images_per_model": len(metas) * e.seeds, **summary,
              "figures": {"curves": figures["curves"], "selection": figures["selection"],
                          "grids": [g[1] for g in grids]}}
    dump_json(result, out / "results.json")

    # ---- the console
    for m in summary["models"]:
        print(f"\n{m['label']} ({m['path']})\n{format_table(m['table'])}")
    T = e.target
    ref_s, last = summary["models"][0], summary["models"][-1]
    print(f"\n{'model':<22}{T:>10}{'gain':>9}{'corrected':>11}  " + "  ".join(e.out_of_domain))
    for m in summary["models"][1:]:
        print(f"{m['label']:<22}{m['overall'][T]['value']:>10.3f}{m['gain']['value']:>+9.3f}"
              f"{m['corrected']['value']:>+11.3f}  " + "  ".join(f"{m['overall'][o]['value']:.3f}"
                                                          for o in e.out_of_domain))
    if summary["trend"]:
        print(f"trend: {summary['trend']['verdict']}")
    print(f"best by corrected score: {summary['best']}")
    O = e.out_of_domain[0]
    s0, s1 = ref_s["overall"][T]["value"], last["overall"][T]["value"]
    win, win_label = (verifier.win_metric, verifier.win_label) if verifier is not None else (T, T)
    w = last["win_rate"][win]
    print(f"{T} {s0:.3f} -> {s1:.3f} ({s1 - s0:+.3f}); {O} (out-of-domain) "
          f"{ref_s['overall'][O]['value']:.3f} -> {last['overall'][O]['value']:.3f}; {win_label} "
          f"win rate {w['value']:.2f} (ties {w['ties']:.2f}) [{last['label']}]")
    print(f"report: {md} and {page}")
    return result
