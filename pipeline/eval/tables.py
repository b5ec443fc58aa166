"""Per-kind tables of per-image scores, as GenEval reports them (overall = mean over the kinds present)."""
from __future__ import annotations

import numpy as np

# GenEval's prompt kinds, in the order of its results table
GENEVAL_KINDS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def kind_order(tags) -> list[str]:
    """The tags present: GenEval's kinds in their order, then any other tags (`ocr`, `prompt`, ...) sorted."""
    present = set(tags)
    return [k for k in GENEVAL_KINDS if k in present] + sorted(present - set(GENEVAL_KINDS))


def kind_table(scores: dict[str, np.ndarray], kinds: list[str]) -> dict[str, dict[str, float]]:
    """{metric: {kind: mean, ..., "overall": mean over the kinds present}} like GenEval's results table; GenEval's
    kinds in their order, then any other tags (`ocr`, `prompt`, ...) sorted."""
    kinds_arr = np.asarray(kinds)
    order = kind_order(kinds_arr.tolist())
    table: dict[str, dict[str, float]] = {}
    for metric, values in scores.items():
        row = {k: float(values[kinds_arr == k].mean()) for k in order}
        row["overall"] = float(np.mean(list(row.values()))) if row else float("nan")
        table[metric] = row
    return table


def format_estimate(est: dict | None, signed: bool = False) -> str:
    """{"value": v, "ci": [lo, hi] or None} -> "v [lo, hi]" (3 decimals; `signed` for gains); "" for None. The one
    way an estimate and its interval are written: the report page and the recipes' tables."""
    if est is None:
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    s = f.format(est["value"])
    if est.get("ci"):
        s += " [" + ", ".join(f.format(v) for v in est["ci"]) + "]"
    return s


def format_table(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))  # the kinds, then overall
    width = max(9, *(len(m) + 1 for m in table))
    head = f"{'metric':<{width}}" + "".join(f"{c[:11]:>12}" for c in cols)
    lines = [head] + [f"{m:<{width}}" + "".join(f"{row[c]:>12.3f}" for c in cols) for m, row in table.items()]
    return "\n".join(lines)
