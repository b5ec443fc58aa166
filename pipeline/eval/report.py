"""`gdro eval`'s report: the summary of every evaluated model (overall scores with bootstrap intervals, per-kind
tables, win rates on the same noise, corrected score, hacking trend), the curves over training steps, and a
Markdown + HTML page linking them and the grids. The formulas live in `pipeline/eval/stats.py`."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .stats import (
    CorrectedConfig,
    bootstrap_indices,
    corrected_scores,
    line_means,
    ols_slope,
    overall,
    percentile_ci,
    resampled_overall,
    win_scores,
)
from .tables import format_estimate, kind_table

FORMULA = ("corrected = (T - T_ref) - lambda * (loss + h * max(0, -slope)); loss = mean over out-of-domain "
           "scores O of max(0, 1 - O / O_ref); slope = least-squares slope of O / O_ref over the last `window` "
           "evaluated points (the reference is the point (0, 1)), per step; h = `horizon` steps, or (horizon 0) "
           "the interval since the previous evaluated point")


def _est(value, samples, level, scale: float = 1.0) -> dict:
    ci = list(percentile_ci(np.asarray(samples) * scale, level)) if samples is not None else None
    return {"value": float(value) * scale, "ci": ci}


def summarise(models: list[dict], kinds: list[str], seeds: int, e) -> dict:
    """models[0] is the reference; each {label, step, path, scores: {metric: per-image array}} (lines x seeds,
    member-major). `e` is the EvalConfig. Returns a JSON-able dict; identical inputs give identical output."""
    kinds = np.asarray(kinds)
    metrics = list(models[0]["scores"])
    n_models = len(models)
    lines = {m: np.stack([line_means(x["scores"][m], seeds) for x in models]) for m in metrics}  # [M, N]
    point = {m: overall(lines[m], kinds) for m in metrics}  # [M]
    idx = bootstrap_indices(kinds, e.bootstrap, e.bootstrap_seed) if e.bootstrap else None
    boot = {m: resampled_overall(lines[m], kinds, idx) for m in metrics} if idx is not None else None  # [M, B]
    level = e.ci_level
    T, O = e.target, list(e.out_of_domain)
    ccfg = CorrectedConfig(lam=e.corrected_lambda, horizon=e.corrected_horizon, window=e.corrected_window)

    def corrected(ks: list[int], steps) -> tuple[dict, dict | None]:
        pt = corrected_scores(steps, point[T][ks], point[T][0], np.stack([point[o][ks] for o in O]),
                              np.array([point[o][0] for o in O]), ccfg)
        if boot is None:
            return pt, None
        bt = corrected_scores(steps, boot[T][ks].T, boot[T][0], np.stack([boot[o][ks].T for o in O]),
                              np.stack([boot[o][0] for o in O]), ccfg)
        return pt, bt

    series = [k for k in range(1, n_models) if models[k]["step"] is not None]
    loose = [k for k in range(1, n_models) if models[k]["step"] is None]
    corr: dict[int, tuple[dict, dict | None, int]] = {}
    for ks, steps in ((series, [models[k]["step"] for k in series]), (loose, None)):
        if ks:
            pt, bt = corrected(ks, steps)
            for j, k in enumerate(ks):
                corr[k] = (pt, bt, j)

    rep_kinds = np.repeat(kinds, seeds)
    out_models = []
    for k, mdl in enumerate(models):
        entry = {"label": mdl["label"], "step": mdl["step"], "path": str(mdl["path"]),
                 "overall": {m: _est(point[m][k], boot[m][k] if boot else None, level) for m in metrics},
                 "table": kind_table(mdl["scores"], list(rep_kinds))}
        if k > 0:
            entry["win_rate"] = {}
            for m in metrics:
                ws = win_scores(mdl["scores"][m], models[0]["scores"][m])
                wl = line_means(ws, seeds)
                est = _est(overall(wl, kinds), resampled_overall(wl, kinds, idx) if idx is not None else None, level)
                est["ties"] = float(np.mean(ws == 0.5))
                entry["win_rate"][m] = est
            pt, bt, j = corr[k]
            for name in ("gain", "loss", "projected", "corrected"):
                entry[name] = _est(pt[name][j], bt[name][:, j] if bt else None, level)
            entry["slope_per_1000"] = _est(pt["slope"][j], bt["slope"][:, j] if bt else None, level, 1000.0)
        out_models.append(entry)

    trained = out_models[1:]
    best = max(trained, key=lambda x: x["corrected"]["value"])["label"] if trained else None
    return {"target": T, "out_of_domain": O, "metrics": metrics, "lines": len(kinds), "seeds": seeds,
            "corrected_score": {"lambda": ccfg.lam, "horizon": ccfg.horizon, "window": ccfg.window,
                                "formula": FORMULA},
            "bootstrap": {"resamples": e.bootstrap, "seed": e.bootstrap_seed, "level": level,
                          "unit": "prompt line, stratified by kind, paired across models"},
            "models": out_models, "trend": _trend(models, series, point, boot, T, O, level), "best": best}


def _trend(models, series, point, boot, T, O, level) -> dict | None:
    """Whole-run slopes (per 1000 steps) of the target and of the relative out-of-domain score, reference
    included at step 0, and a verdict."""
    if not series:
        return None
    ks = [0, *series]
    steps = np.array([0, *[models[k]["step"] for k in series]], np.float64)

    def rel(values):  # mean over out-of-domain scores of O / O_ref, along the model axis (first)
        return np.mean([values[o][ks] / np.where(np.abs(values[o][0]) > 1e-8, np.abs(values[o][0]), 1.0)
                        for o in O], 0)

    t_pt = ols_slope(steps, point[T][ks]) * 1000
    o_pt = ols_slope(steps, rel(point)) * 1000
    t_bs = ols_slope(steps, boot[T][ks].T) * 1000 if boot else None
    o_bs = ols_slope(steps, rel(boot).T) * 1000 if boot else None
    target, ood = _est(t_pt, t_bs, level), _est(o_pt, o_bs, level)
    t_up = target["ci"][0] > 0 if target["ci"] else target["value"] > 0  # significant: the interval excludes 0
    o_down = ood["ci"][1] < 0 if ood["ci"] else ood["value"] < 0
    if o_down and t_up:
        verdict = "reward hacking: the target rises while the out-of-domain score falls"
    elif o_down:
        verdict = "degradation: the out-of-domain score falls without a significant target gain"
    elif t_up:
        verdict = "improvement: the target rises and the out-of-domain score does not fall significantly"
    else:
        verdict = "no significant trend in the target or the out-of-domain score"
    return {"steps": steps.astype(int).tolist(), "target_per_1000": target, "out_of_domain_rel_per_1000": ood,
            "verdict": verdict}


# ------------------------------------------------------------------------------------------------ figures
def plot_curves(summary: dict, path: Path, title: str) -> Path | None:
    """Scores (left) and target gain vs. corrected score (right) over training steps, with bootstrap bands."""
    pts = [m for m in summary["models"] if m["step"] is not None]
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["step"] for m in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric in summary["metrics"]:
        role = " (target)" if metric == summary["target"] else (
            " (out-of-domain)" if metric in summary["out_of_domain"] else "")
        style = "-" if role else ":"
        _band(a, x, [m["overall"][metric] for m in pts], f"{metric}{role}", style)
    a.set_xlabel("training step (0 = reference)")
    a.set_ylabel("score, mean over kinds")
    a.set_title("scores on the held-out prompts")
    a.legend(fontsize=8)
    zero = {"value": 0.0, "ci": [0.0, 0.0]}
    _band(b, x, [zero] + [m["gain"] for m in pts[1:]], f"target gain ({summary['target']} - reference)", "-")
    _band(b, x, [zero] + [m["corrected"] for m in pts[1:]], "corrected score", "-")
    b.axhline(0.0, color="grey", lw=0.8)
    c = summary["corrected_score"]
    b.set_xlabel("training step (0 = reference)")
    b.set_ylabel("change vs. reference")
    b.set_title(f"corrected score (lambda {c['lambda']:g}, horizon {_horizon(c)}, window {c['window']})", fontsize=9)
    b.legend(fontsize=8)
    level = summary["bootstrap"]["level"]
    fig.suptitle(f"{title}\nbands: {level:.0%} bootstrap intervals over prompts" if summary["bootstrap"]["resamples"]
                 else title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _horizon(c: dict) -> str:
    return f"{c['horizon']:g} steps" if c["horizon"] > 0 else "1 interval"


def _band(ax, x, ests, label, style):
    y = [e["value"] for e in ests]
    (line,) = ax.plot(x, y, style, marker="o", ms=3.5, label=label)
    if all(e["ci"] for e in ests):
        ax.fill_between(x, [e["ci"][0] for e in ests], [e["ci"][1] for e in ests], color=line.get_color(),
                        alpha=0.18, lw=0)


def plot_selection(records: list[dict], path: Path, target: str, ood: list[str]) -> Path | None:
    """The evaluations `gdro train` made every train.eval_every steps (pipeline/eval/selection.py)."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.0))
    for name in (target, *ood):
        a.plot(x, [r["scores"][name] for r in records], marker="o", ms=3,
               label=f"{name} ({'target' if name == target else 'out-of-domain'})")
    a.set_xlabel("training step (0 = reference)")
    a.set_ylabel("score, mean over kinds")
    a.set_title(f"during training: {records[0]['lines']} held-out prompt lines")
    a.legend(fontsize=8)
    b.plot(x, [r.get("gain", 0.0) for r in records], marker="o", ms=3, label="target gain")
    b.plot(x, [r.get("corrected", 0.0) for r in records], marker="o", ms=3, label="corrected score")
    best = [r for r in records if r.get("best")]
    if best:
        b.scatter([best[-1]["step"]], [best[-1]["corrected"]], s=80, facecolors="none", edgecolors="k",
                  label=f"kept in best/ (step {best[-1]['step']})", zorder=3)
    b.axhline(0.0, color="grey", lw=0.8)
    b.set_xlabel("training step (0 = reference)")
    b.set_ylabel("change vs. reference")
    b.set_title("corrected score during training (selection)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ the page
def report_blocks(summary: dict, meta: dict, figures: dict) -> list[tuple]:
    """The page as blocks: ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, alt)."""
    T, O = summary["target"], summary["out_of_domain"]
    level = summary["bootstrap"]["level"]
    c = summary["corrected_score"]
    blocks: list[tuple] = [
        ("h", 1, f"Evaluation report: {meta['run']}"),
        ("p", f"{summary['lines']} prompt lines of {meta['prompts']} x {summary['seeds']} seed(s) (noise base seed "
              f"{meta['base_seed']}, the same noise for every model), {meta['sampler']}. Target: **{T}**; "
              f"out-of-domain: **{', '.join(O)}** (never optimised). Overall = mean over the prompt kinds. "
              + (f"Brackets: {level:.0%} bootstrap intervals ({summary['bootstrap']['resamples']} resamples of the "
                 f"prompt lines, stratified by kind, paired across models)." if summary["bootstrap"]["resamples"]
                 else "No bootstrap (eval.bootstrap=0).")),
    ]
    header = ["model", "step", *summary["metrics"], f"win rate ({T})", "target gain", "corrected score"]
    rows = []
    for m in summary["models"]:
        rows.append([m["label"], "" if m["step"] is None else str(m["step"]),
                     *[format_estimate(m["overall"][k]) for k in summary["metrics"]],
                     format_estimate(m.get("win_rate", {}).get(T)), format_estimate(m.get("gain"), True), format_estimate(m.get("corrected"), True)])
    blocks += [("h", 2, "Summary"), ("table", header, rows)]
    if summary["best"]:
        blocks.append(("p", f"Best trained model by corrected score: **{summary['best']}**."))
    tr = summary["trend"]
    if tr:
        blocks += [("h", 2, "Hacking trend"),
                   ("p", (f"Over steps {tr['steps']}: target {T} {format_estimate(tr['target_per_1000'], True)} per 1000 steps; "
                         f"out-of-domain score relative to the reference {format_estimate(tr['out_of_domain_rel_per_1000'], True)}"
                         f" per 1000 steps. Verdict: **{tr['verdict']}**."))]
    if figures.get("curves"):
        blocks += [("h", 2, "Curves"), ("img", figures["curves"], "scores and corrected score over training steps")]
    if figures.get("selection"):
        blocks += [("p", "Evaluations made during training (train.eval_every, a few held-out lines):"),
                   ("img", figures["selection"], "evaluations during training")]
    blocks += [("h", 2, "Corrected score"),
               ("p", (f"Our own formula (the GDRO paper names a corrected score that accounts for the trend of reward "
                     f"hacking but publishes no formula): {FORMULA}; lambda = {c['lambda']:g}, horizon = "
                     f"{_horizon(c)}, window = {c['window']} points. T is the target, O the out-of-domain "
                     f"scores, ref the reference on the same prompts and noise. It is the target gain, discounted by "
                     f"the out-of-domain loss now and by the loss the present downward trend would add over the "
                     f"horizon; see docs/evaluation.md."))]
    if figures.get("grids"):
        blocks += [("h", 2, "Grids"),
                   ("p", ("Same prompts, same noise in each column; the reference on top. "
                         + ("Green frame: strict (GenEval) pass; numbers" if figures.get("verdict_frames", True)
                            else "Numbers")
                         + f" above each image: {figures.get('legend', '')}."))]
        for label, path in figures["grids"]:
            blocks += [("h", 3, label), ("img", path, f"grid {label}")]
    blocks.append(("h", 2, "Per-kind tables"))
    for m in summary["models"]:
        table = m["table"]
        cols = list(next(iter(table.values())))
        blocks += [("h", 3, m["label"]),
                   ("table", ["metric", *cols], [[k, *[f"{row[c_]:.3f}" for c_ in cols]] for k, row in table.items()])]
    return blocks


def write_report(blocks: list[tuple], folder: Path) -> tuple[Path, Path]:
    """report.md and report.html (image paths relative to the folder)."""
    md, ht = [], [("<!doctype html><html><head><meta charset='utf-8'><title>gdro eval</title><style>"
                  "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                  "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
                  "img{max-width:100%}</style></head><body>")]
    for b in blocks:
        if b[0] == "h":
            md.append("#" * b[1] + " " + b[2])
            ht.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            md.append(b[1])
            text = html.escape(b[1])
            while "**" in text:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            ht.append(f"<p>{text}</p>")
        elif b[0] == "table":
            _, header, rows = b
            md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                      + "\n".join("| " + " | ".join(r) + " |" for r in rows))
            ht.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                      + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                      + "</table>")
        elif b[0] == "img":
            md.append(f"![{b[2]}]({b[1]})")
            ht.append(f"<p><a href='{html.escape(b[1])}'><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'>"
                      f"</a></p>")
    ht.append("</body></html>")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("\n\n".join(md) + "\n")
    (folder / "report.html").write_text("\n".join(ht) + "\n")
    return folder / "report.md", folder / "report.html"


def dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
