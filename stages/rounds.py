"""Recipe: rounds of offline training, each from the model the previous one made (`gdro rounds`).

round k (k = 1..N), in <out>/round_k/: rollouts from the current model (round 1: model.path, i.e. today's offline
run; round k > 1: round k-1's export: the semi-online regime) into dataset/ -> train from that model on it into
run/ (its reference is the model that generated the data, so the reference cache applies) -> export -> eval of
the export against the base model (model.path) on the held-out prompts, same noise every round, into eval/ ->
round.json (timings, scores), written last. The dataset's manifest records the lineage (rollouts.lineage).

Resumable at any point: a round with round.json is done; inside one, each stage resumes on its own (finished
shards are kept, training continues from its newest checkpoint, export and evaluation are rewritten), so a
chain killed anywhere ends with the datasets and the model an uninterrupted chain gives. Timings are those of
each stage's completed attempt. <out>/summary.md and summary.png: the scores over rounds.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pipeline.config import ExperimentConfig, save_resolved
from pipeline.errors import GdroError
from pipeline.eval.tables import format_estimate
from schemas import layout

ROUND_DONE = "round.json"
SUMMARY_MD, SUMMARY_PNG = "summary.md", "summary.png"


def round_dir(out: Path, k: int) -> Path:
    return Path(out) / f"round_{k}"


def generator_of(cfg: ExperimentConfig, out: Path, k: int) -> str:
    """The model round k samples from and trains: the base for round 1, round k-1's export after."""
    return cfg.model.path if k == 1 else str(round_dir(out, k - 1) / "run" / "export")


def lineage(cfg: ExperimentConfig, out: Path, k: int) -> list[dict]:
    """Rounds 1..k: each round's generator, dataset and run (paths relative to `out`, the base as given)."""
    def rel(p) -> str:
        return str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p)

    return [{"round": j, "generator": rel(generator_of(cfg, out, j)), "dataset": rel(round_dir(out, j) / "dataset"),
             "run": rel(round_dir(out, j) / "run")} for j in range(1, k + 1)]


def round_config(cfg: ExperimentConfig, out: Path, k: int) -> tuple[ExperimentConfig, ExperimentConfig]:
    """(the config of round k's rollouts and training, that of its evaluation against the base)."""
    d = round_dir(out, k)
    rc = copy.deepcopy(cfg)
    rc.model.path = generator_of(cfg, out, k)
    rc.rollouts.out = rc.train.dataset = str(d / "dataset")
    rc.rollouts.lineage = lineage(cfg, out, k)
    rc.train.out = str(d / "run")
    ec = copy.deepcopy(rc)
    ec.model.path = cfg.model.path  # every round against the same base, with the same noise
    ec.eval.checkpoint = str(d / "run" / "export")
    ec.eval.out = str(d / "eval")
    return rc, ec


def _timed(timing: dict, key: str, path: Path, fn) -> None:
    t0 = time.time()
    fn()
    timing[key] = round(time.time() - t0, 2)
    layout.atomic_write(path, (json.dumps(timing, indent=1) + "\n").encode())


def run_round(cfg: ExperimentConfig, out: Path, k: int) -> dict:
    from stages.evaluate import main as evaluate
    from stages.rollouts import main as rollouts
    from stages.train import main as train

    d = round_dir(out, k)
    if (d / ROUND_DONE).is_file():
        return json.loads((d / ROUND_DONE).read_text())
    rc, ec = round_config(cfg, out, k)
    if k > 1 and not Path(rc.model.path).is_dir():
        raise GdroError(f"round {k} starts from {rc.model.path}, which does not exist; rerun `gdro rounds` with "
                        f"the same --out to finish round {k - 1} first")
    d.mkdir(parents=True, exist_ok=True)
    timing_path = d / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    print(f"rounds: round {k}: generator {rc.model.path}", flush=True)
    if not (Path(rc.rollouts.out) / layout.MANIFEST).is_file():
        _timed(timing, "rollouts_s", timing_path, lambda: rollouts(rc))
    if not (Path(rc.train.out) / "export").is_dir():
        _timed(timing, "train_s", timing_path, lambda: train(rc))
    res = {}
    _timed(timing, "eval_s", timing_path, lambda: res.update(evaluate(ec)))
    T, O = res["target"], res["out_of_domain"][0]
    ref, last = res["models"][0], res["models"][-1]
    record = {"round": k, "generator": rc.model.path, "dataset": rc.rollouts.out, "run": rc.train.out,
              "target": T, "out_of_domain": O, "reference": ref["overall"][T]["value"],
              "score": last["overall"][T]["value"], "gain": last["gain"]["value"], "gain_ci": last["gain"].get("ci"),
              "reference_ood": ref["overall"][O]["value"], "ood": last["overall"][O]["value"], **timing}
    layout.atomic_write(d / ROUND_DONE, (json.dumps(record, indent=1) + "\n").encode())  # last: the round is done
    return record


def summary_table(records: list[dict]) -> str:
    T, O = records[0]["target"], records[0]["out_of_domain"]
    lines = [f"| round | {T} | gain over the base (95% CI) | {O} | rollouts s | train s | cumulative s |",
             "|---|---|---|---|---|---|---|",
             f"| 0 (base) | {records[0]['reference']:.3f} | | {records[0]['reference_ood']:.3f} | | | 0 |"]
    total = 0.0
    for r in records:
        total += r.get("rollouts_s", 0.0) + r.get("train_s", 0.0)
        gain = format_estimate({"value": r["gain"], "ci": r.get("gain_ci")}, signed=True)
        lines.append(f"| {r['round']} | {r['score']:.3f} | {gain} | {r['ood']:.3f} | "
                     f"{r.get('rollouts_s', 0):.0f} | {r.get('train_s', 0):.0f} | {total:.0f} |")
    return "\n".join(lines)


def plot_rounds(records: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, O = records[0]["target"], records[0]["out_of_domain"]
    xs = [0] + [r["round"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(xs, [records[0]["reference"]] + [r["score"] for r in records], "o-", label=f"{T} (target)")
    ax.plot(xs, [records[0]["reference_ood"]] + [r["ood"] for r in records], "s--", label=f"{O} (out of domain)")
    ax.set_xticks(xs)
    ax.set_xlabel("round (0 = base)")
    ax.set_ylabel("held-out score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.rename(path)
    return path


def main(cfg: ExperimentConfig, *, rounds: int, out: Path) -> str:
    if rounds < 1:
        raise GdroError(f"--rounds must be >= 1, got {rounds}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.model.path = str(Path(cfg.model.path).resolve())
    saved = out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(_plain(cfg))):
        raise GdroError(f"{out} holds rounds run with another configuration (config.json differs); rerun with the "
                        f"same --preset/--set, or choose another --out")
    save_resolved(cfg, saved)
    records = [run_round(cfg, out, k) for k in range(1, rounds + 1)]
    table = summary_table(records)
    layout.atomic_write(out / SUMMARY_MD, (f"Rounds of `gdro rounds` in {out}: each round samples from the previous "
                                           f"round's model, trains on those samples, and is evaluated against the "
                                           f"base on the held-out prompts with the same noise.\n\n{table}\n").encode())
    plot_rounds(records, out / SUMMARY_PNG)
    return table


def _plain(cfg: ExperimentConfig) -> dict:
    from pipeline.config import to_dict

    return to_dict(cfg)
