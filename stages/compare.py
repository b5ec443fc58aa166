"""Recipe: the loss family side by side on one dataset: train -> export -> eval per variant, one table.

Every variant trains on the same dataset (train.dataset), for the same steps and seed, and is evaluated on
the same held-out prompts and noise; a variant is a loss name with optional overrides
(`dpo:train.beta=50`). Runs are `gdro train` / `gdro eval` subprocesses, exactly as a user runs them, in
<out>/<variant>/; a variant whose eval/results.json exists is read, not re-run (a killed comparison resumes).
With a ceiling (the eval folder of `make ceiling`), each gain is also shown as a share of the ceiling's.
Writes <out>/table.md (and --doc, if given).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import GdroError
from pipeline.eval.tables import format_estimate


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """'dpo:train.beta=50,train.lr=2e-5' -> ('dpo-beta50-lr2e-5' slug, 'dpo', ['train.loss=dpo', ...])."""
    loss, _, rest = spec.partition(":")
    sets = [s for s in rest.split(",") if s]
    for s in sets:
        if "=" not in s:
            raise GdroError(f"variant {spec!r}: {s!r} is not KEY=VALUE")
    slug = "-".join([loss] + [re.sub(r"[^A-Za-z0-9.+-]", "", s.split(".")[-1].replace("=", "")) for s in sets])
    return slug, loss, [f"train.loss={loss}", *sets]


def _gdro(args: list[str]) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True)
    return time.time() - t0


def _ood(res: dict) -> str:
    """The out-of-domain score the table shows: the first that `gdro eval` lists (results.json holds a list)."""
    return res["out_of_domain"][0]


def _row(label: str, res: dict, wall: float | None, ceiling_gain: float | None) -> dict:
    m = res["models"][-1]
    T, O = res["target"], _ood(res)
    ref = res["models"][0]
    row = {"variant": label, "target": m["overall"][T]["value"], "gain": m["gain"]["value"],
           "gain_ci": m["gain"].get("ci"), "ood": m["overall"][O]["value"],
           "ood_change": m["overall"][O]["value"] - ref["overall"][O]["value"], "wall_s": wall,
           "reference": ref["overall"][T]["value"]}
    row["share"] = row["gain"] / ceiling_gain if ceiling_gain else None
    return row


def format_table(rows: list[dict], target: str, ood: str) -> str:
    def gain(r):
        return format_estimate({"value": r["gain"], "ci": r["gain_ci"]}, signed=True)

    lines = [f"| variant | {target} | gain (95% CI) | share of ceiling | {ood} (change) | train + eval s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['share']:.0%}" if r["share"] is not None else ""
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else ""
        lines.append(f"| {r['variant']} | {r['target']:.3f} | {gain(r)} | {share} | "
                     f"{r['ood']:.3f} ({r['ood_change']:+.3f}) | {wall} |")
    return "\n".join(lines)


def main(preset: str, overrides: list[str], variants: list[str], out: Path, ceiling: Path | None = None,
         doc: Path | None = None) -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--preset", preset] + [a for o in overrides for a in ("--set", o)]
    ceiling_res = json.loads((Path(ceiling) / "results.json").read_text()) if ceiling else None
    ceiling_gain = ceiling_res["models"][-1]["gain"]["value"] if ceiling_res else None
    rows = []
    for spec in variants:
        slug, _loss, sets = parse_variant(spec)
        run = out / slug
        results = run / "eval" / "results.json"
        timing = run / "compare_wall.json"
        if not results.is_file():
            sets_args = [a for s in [*sets, f"train.out={run}"] for a in ("--set", s)]
            wall = _gdro(["train", *base, *sets_args])
            wall += _gdro(["eval", *base, *sets_args, "--set", "eval.checkpoints=export"])
            timing.write_text(json.dumps({"wall_s": wall}))
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        rows.append(_row(spec, json.loads(results.read_text()), wall, ceiling_gain))
    if ceiling_res:
        rows.append(_row("ceiling: true renders (outside the paradigm)", ceiling_res, None, ceiling_gain))
    res0 = json.loads((out / parse_variant(variants[0])[0] / "eval" / "results.json").read_text())
    table = format_table(rows, res0["target"], _ood(res0))
    text = (f"Reference {res0['target']} {rows[0]['reference']:.3f}; {res0['lines']} held-out prompt lines x "
            f"{res0['seeds']} seeds, paired bootstrap intervals.\n\n{table}\n")
    (out / "table.md").write_text(text)
    if doc:
        Path(doc).write_text(text)
    return text
