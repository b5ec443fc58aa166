"""Recipe: offline against online on one task, in wall-clock seconds (`gdro offline-vs-online`).

On the same base model, prompt pool, rewards and held-out lines (eval.*, the same noise for every model):
- offline gdro: `gdro rounds` (round 1 = stage one + stage two with train.loss; rounds 2.. = the semi-online
  regime), its curve over round 1's checkpoints, x = stage-one seconds + training seconds up to the checkpoint;
- the further offline experiments the round-1 dataset serves without generating an image (`nft` by default),
  x = the same stage-one seconds + their own training;
- the online baselines (stages/baselines/: DGPO, DiffusionNFT, Flow-GRPO), each with the wall-clock budget of
  offline round 1 (online.max_wall_s), evaluated every online.eval_every iterations;
- the ground-truth ceiling (a model folder: stages/toy_ceiling.py's export) as a horizontal line.
Every point is scored by one function (stages.baselines.common.scores_of). Reported: the final scores, the final
model's gain with its paired bootstrap 95% interval (`gdro eval` of its folder against the base, the same lines
and noise: the rounds' own evaluations, <out>/final/ for the others), the time to 90% of each method's final
gain, offline's over online DGPO's time. Resumable: finished parts (rounds, runs, online results, scored points
under <out>/points/, final evaluations) are kept. Writes <out>/{table.md, results.json, curves.png}
and, with a docs folder, the block between the markers of <docs>/offline_vs_online.md and
<docs>/img/offline_vs_online.png.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

from pipeline import runs
from pipeline.config import ExperimentConfig
from pipeline.errors import GdroError
from pipeline.eval.tables import format_estimate
from schemas import layout

from . import rounds as rounds_recipe
from .baselines.common import RESULT, eval_lines, scores_of

BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"
FIGURE = "img/offline_vs_online.png"


# ------------------------------------------------------------------------------------------------ scoring
def _scored(out: Path, cfg: ExperimentConfig, ref: runs.ModelRef, base: str, metas, rewards) -> dict:
    """The scores of one model (cached under <out>/points/, keyed by its path)."""
    from pipeline.checkpoints import load_model

    key = hashlib.sha256(str(ref.path.resolve()).encode()).hexdigest()[:16]
    cache = out / "points" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    c = copy.deepcopy(cfg)
    c.model.path = base  # a DeepSpeed checkpoint is the base's folder with its transformer weights
    res = scores_of(load_model(ref, c), c, metas, rewards)
    cache.parent.mkdir(parents=True, exist_ok=True)
    layout.atomic_write(cache, json.dumps(res).encode())
    return res


def _final_gain(out: Path, cfg: ExperimentConfig, slug: str, model: Path) -> dict:
    """The final model's gain over the base with its paired, kind-stratified bootstrap interval: `gdro eval` of
    the model folder against the base on the same lines and noise (its results.json, kept in <out>/final/<slug>/:
    the report and grids are there to look at)."""
    from stages.evaluate import main as evaluate

    d = out / "final" / slug
    if not (d / "results.json").is_file():
        c = copy.deepcopy(cfg)
        c.eval.checkpoint, c.eval.out = str(model), str(d)
        evaluate(c)
    last = json.loads((d / "results.json").read_text())["models"][-1]
    return {"value": last["gain"]["value"], "ci": last["gain"].get("ci")}


def _train_clock(run: Path, train_s: float) -> dict[int, float]:
    """{step: seconds since `gdro train` started}: the loop's own step times, the start-up (train_s minus their
    sum: DeepSpeed, data) charged before the first step."""
    recs = runs.read_jsonl(run / runs.METRICS)
    startup = max(0.0, train_s - sum(r["step_s"] for r in recs))
    clock, total = {}, startup
    for r in recs:
        total += r["step_s"]
        clock[int(r["step"])] = total
    return clock


def offline_curve(out: Path, cfg, run: Path, base: str, start_s: float, train_s: float, metas, rewards,
                  base_scores: dict) -> list[dict]:
    """Base at 0 and at `start_s` (nothing moves before stage one is done), then each checkpoint left in `run`."""
    clock = _train_clock(run, train_s)
    pts = [{"wall_s": 0.0, **base_scores}, {"wall_s": start_s, **base_scores}]
    for ref in runs.run_models(run, "all"):
        if ref.step:
            pts.append({"wall_s": start_s + clock[ref.step], "step": ref.step,
                        **_scored(out, cfg, ref, base, metas, rewards)})
    return pts


# ------------------------------------------------------------------------------------------------ numbers
def time_to_fraction(curve: list[dict], target: str, fraction: float = 0.9) -> float | None:
    """Seconds of the first point whose gain over the base reaches `fraction` of the final gain; None when the
    final gain is not positive."""
    base, final = curve[0][target], curve[-1][target]
    if final - base <= 0:
        return None
    return next(p["wall_s"] for p in curve if p[target] - base >= fraction * (final - base))


def summarise(methods: dict[str, dict], target: str, ood: str) -> dict:
    rows = []
    for name, m in methods.items():
        c = m["curve"]
        rows.append({"method": name, "target": c[-1][target], "gain": c[-1][target] - c[0][target],
                     "gain_ci": (m.get("final_gain") or {}).get("ci"),
                     "ood": c[-1][ood], "ood_change": c[-1][ood] - c[0][ood], "wall_s": c[-1]["wall_s"],
                     "t90_s": time_to_fraction(c, target), "images": m.get("images")})
    by = {r["method"]: r for r in rows}
    off, on = by.get("offline gdro"), by.get("online DGPO")
    ratio = off["t90_s"] / on["t90_s"] if off and on and off["t90_s"] and on["t90_s"] else None
    return {"rows": rows, "t90_ratio_offline_over_online_dgpo": ratio}


def format_table(summary: dict, target: str, ood: str, ceiling: float | None, served: list[str]) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    def gain(r):
        return format_estimate({"value": r["gain"], "ci": r.get("gain_ci")}, signed=True)

    lines = [(f"| method | {target} | gain (95% CI) | {ood} (change) | wall-clock s | s to 90% of its gain | "
              f"images generated |"), "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['method']} | {r['target']:.3f} | {gain(r)} | {r['ood']:.3f} ({r['ood_change']:+.3f}) "
                     f"| {r['wall_s']:.0f} | {num(r['t90_s'], '.0f')} | {num(r['images'], 'd')} |")
    if ceiling is not None:
        lines.append(f"| ceiling: true renders (outside the paradigm) | {ceiling:.3f} | | | | | |")
    ratio = summary["t90_ratio_offline_over_online_dgpo"]
    lines += ["", (f"Time to 90% of the final gain, offline gdro (stage one included) over online DGPO: "
                  f"{num(ratio, '.2f')}."),
              (f"The one stage-one dataset served {len(served)} training runs without generating an image: "
              f"{', '.join(served)}.")]
    return "\n".join(lines)


def plot(methods: dict[str, dict], target: str, ood: str, ceiling: float | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for ax, metric in zip(axes, (target, ood)):
        for name, m in methods.items():
            c = m["curve"]
            ax.plot([p["wall_s"] / 60 for p in c], [p[metric] for p in c], "o-" if "online" in name else "s-",
                    ms=3, label=name)
        base = next(iter(methods.values()))["curve"][0][metric]
        ax.axhline(base, color="grey", ls=":", lw=1, label="base")
        if metric == target and ceiling is not None:
            ax.axhline(ceiling, color="black", ls="--", lw=1, label="ceiling (true renders)")
        ax.set_xlabel("wall-clock minutes (stage one included; evaluation excluded)")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.rename(path)
    return path


def write_doc(docs: Path, text: str) -> Path:
    page = Path(docs) / "offline_vs_online.md"
    if not page.is_file():
        raise GdroError(f"{page} does not exist: --docs must be the folder holding offline_vs_online.md")
    body = page.read_text()
    if BEGIN not in body or END not in body:
        raise GdroError(f"{page} lacks the markers {BEGIN} ... {END} the comparison replaces")
    head, rest = body.split(BEGIN, 1)
    layout.atomic_write(page, f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}".encode())
    return page


# ------------------------------------------------------------------------------------------------ the recipe
def main(cfg: ExperimentConfig, *, out: Path, n_rounds: int = 2, extra_losses: tuple[str, ...] = ("nft",),
         online: tuple[str, ...] = ("dgpo", "nft", "flow-grpo"), ceiling: Path | None = None,
         docs: Path | None = None) -> str:
    from pipeline.eval.fixed_noise import eval_rewards
    from stages.baselines.online import main as run_online
    from stages.train import main as train

    out = Path(out).resolve()
    cfg = copy.deepcopy(cfg)
    cfg.model.path = base = str(Path(cfg.model.path).resolve())
    T, O = cfg.eval.target, cfg.eval.out_of_domain[0]
    metas, rewards = eval_lines(cfg), eval_rewards(cfg)
    base_scores = _scored(out, cfg, runs.ModelRef("base", 0, Path(base), "folder"), base, metas, rewards)

    # ---- offline: the rounds (round 1 is the offline run), then the other losses on round 1's dataset
    rounds_dir = out / "rounds"
    rounds_recipe.main(cfg, rounds=n_rounds, out=rounds_dir)
    recs = [json.loads((rounds_recipe.round_dir(rounds_dir, k) / rounds_recipe.ROUND_DONE).read_text())
            for k in range(1, n_rounds + 1)]
    r1 = recs[0]
    stage_one = r1["rollouts_s"]
    methods = {"offline gdro": {"curve": offline_curve(out, cfg, Path(r1["run"]), base, stage_one, r1["train_s"],
                                                       metas, rewards, base_scores),
                                "images": _images(Path(r1["dataset"])),
                                "final_gain": {"value": r1["gain"], "ci": r1["gain_ci"]}}}
    chain, total = [{"wall_s": 0.0, **base_scores}], 0.0
    for k, r in enumerate(recs, 1):
        total += r["rollouts_s"] + r["train_s"]
        export = runs.ModelRef(f"round {k}", None, Path(r["run"]) / runs.EXPORT, "folder")
        chain.append({"wall_s": total, "round": k, **_scored(out, cfg, export, base, metas, rewards)})
    methods[f"offline rounds (1-{n_rounds})"] = {"curve": chain,
                                                 "images": sum(_images(Path(r["dataset"])) for r in recs),
                                                 "final_gain": {"value": recs[-1]["gain"], "ci": recs[-1]["gain_ci"]}}
    served = [f"gdro ({cfg.train.loss})"]
    for loss in extra_losses:
        run = out / f"offline_{loss}"
        timing = run / "compare_timing.json"
        if not timing.is_file():
            c = copy.deepcopy(cfg)
            c.train.loss, c.train.dataset, c.train.out = loss, r1["dataset"], str(run)
            t0 = time.time()
            train(c)
            layout.atomic_write(timing, json.dumps({"train_s": round(time.time() - t0, 2)}).encode())
        methods[f"offline {loss}"] = {"curve": offline_curve(out, cfg, run, base, stage_one,
                                                             json.loads(timing.read_text())["train_s"], metas,
                                                             rewards, base_scores), "images": 0,
                                     "final_gain": _final_gain(out, cfg, f"offline_{loss}", run / runs.EXPORT)}
        served.append(loss)

    # ---- online, each with the wall-clock of offline round 1
    budget = stage_one + r1["train_s"]
    for m in online:
        o_dir = out / f"online_{m}"
        if not (o_dir / RESULT).is_file():
            c = copy.deepcopy(cfg)
            c.online.method, c.online.out = m, str(o_dir)
            c.online.max_wall_s = c.online.max_wall_s or budget
            run_online(c)
        res = json.loads((o_dir / RESULT).read_text())
        methods[{"dgpo": "online DGPO", "nft": "online NFT", "flow-grpo": "online Flow-GRPO"}[m]] = {
            "curve": res["curve"], "images": res["images"],
            "final_gain": _final_gain(out, cfg, f"online_{m}", o_dir / "export")}

    # ---- the ceiling, the numbers, the figure, the page
    ceiling_score = None
    if ceiling is not None:
        if not Path(ceiling).is_dir():
            raise GdroError(f"--ceiling {ceiling}: not a model folder (make ceiling writes runs/toy-ceiling/export; "
                            f"'train' fits it here)")
        ceiling_score = _scored(out, cfg, runs.ModelRef("ceiling", None, Path(ceiling), "folder"), base, metas,
                                rewards)[T]
    summary = summarise(methods, T, O)
    table = format_table(summary, T, O, ceiling_score, served)
    head = (f"{len(metas)} held-out lines of {cfg.eval.prompts} x {cfg.eval.seeds} seed(s), the same noise for every "
            f"model; base {T} {base_scores[T]:.3f}, {O} {base_scores[O]:.3f}. Online budget: {budget:.0f} s each "
            f"(offline round 1's stage one + training).\n\n")
    text = head + table + "\n"
    layout.atomic_write(out / "table.md", text.encode())
    layout.atomic_write(out / "results.json", (json.dumps({"methods": methods, "summary": summary, "ceiling":
                                                           ceiling_score, "served": served}, indent=1) + "\n").encode())
    plot(methods, T, O, ceiling_score, out / "curves.png")
    if docs is not None:
        shutil.copyfile(out / "curves.png", Path(docs) / FIGURE)
        write_doc(docs, text + f"\n![{T} and {O} against wall-clock seconds]({FIGURE})\n")
    return text


def _images(dataset: Path) -> int:
    return int(json.loads((dataset / layout.MANIFEST).read_text())["totals"]["images"])
