"""Look at a dataset: a summary table, a contact sheet of groups sorted by reward, and rollout progress."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from schemas import layout
from schemas.codec import ShardError
from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest
from schemas.records import REWARD_PREFIX, ShardStats
from schemas.scan import manifest_problem, scan_dataset

from .errors import GdroError


def read_rows(root: Path, shards: list[dict] | None = None):
    """The Parquet rows of a finished dataset (of `shards`, default all) as one pandas DataFrame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = _manifest(root)
    tables = [pq.read_table(Path(root) / sh["parquet"]) for sh in (m["shards"] if shards is None else shards)]
    return m, pa.concat_tables(tables).to_pandas()


def damaged_shards(root: Path, m: dict) -> dict[str, str]:
    """{shard name: what is wrong} from the header scan and missing files (no hashing: cheap on any size);
    a member outside the schema refuses the whole dataset instead."""
    if bad := manifest_problem(m):
        raise GdroError(f"{Path(root) / layout.MANIFEST}: {bad}")
    problems = scan_dataset(Path(root), m)
    hostile = [p for p in problems if p.hostile]
    if hostile:
        more = f" ({len(hostile) - 1} more shard(s): `gdro verify {root}` lists them)" if len(hostile) > 1 else ""
        raise GdroError(f"{root}: {hostile[0]}{more}")
    damaged = {p.shard: str(p) for p in problems}
    for sh in m["shards"]:
        for kind in ("tar", "parquet"):
            if sh["name"] not in damaged and not (Path(root) / sh[kind]).is_file():
                damaged[sh["name"]] = f"shard {sh['name']}: {sh[kind]} is missing; fetch it again or re-generate it"
    return damaged


def _manifest(root: Path) -> dict:
    try:
        return load_manifest(root)
    except ShardError as e:
        raise GdroError(str(e)) from None


def inspect_dataset(root: Path, sheet: Path | None = None, n_groups: int = 6) -> str:
    m = _manifest(root)
    damaged = damaged_shards(root, m)
    sound = [sh for sh in m["shards"] if sh["name"] not in damaged]
    if not sound:
        raise GdroError(f"{root}: every shard is damaged, first {next(iter(damaged.values()))}")
    m, df = read_rows(root, sound)
    rewards = [c for c in df.columns if c.startswith(REWARD_PREFIX)]
    lines = [(f"dataset {root}: {m['totals']['groups']} groups, {m['totals']['images']} images, "
              f"{m['totals']['failed_images']} failed, G={m['group_size']}, {m['totals']['shards']} shards, "
              f"generator {m['generator']['backend']} ({m['fingerprint']})")]
    if damaged:
        lines += [f"DAMAGED {text}" for text in damaged.values()]
        lines.append(f"the statistics below cover the {len(sound)} sound shards of {len(m['shards'])}")
    lines.append(f"{'reward':<22}{'mean':>8}{'std':>8}{'zero-spread groups':>20}")
    for col in rewards:
        spread = df.groupby("key")[col].agg(lambda v: np.nanmax(v) - np.nanmin(v) if v.notna().any() else 0.0)
        lines.append(f"{col[len(REWARD_PREFIX):]:<22}{df[col].mean():>8.3f}{df[col].std():>8.3f}"
                     f"{int((spread <= 1e-12).sum()):>12d} of {len(spread)}")
    if df["tag"].nunique() > 1:
        table = df.groupby("tag")[rewards].mean()
        table.columns = [c[len(REWARD_PREFIX):] for c in table.columns]
        lines.append("per kind (mean):\n" + table.to_string(float_format=lambda v: f"{v:.3f}"))
    sheet = sheet or Path(root) / "contact_sheet.png"
    contact_sheet(Path(root), {**m, "shards": sound}, sheet, n_groups,
                  rewards[0][len(REWARD_PREFIX):] if rewards else None)
    lines.append(f"contact sheet: {sheet}")
    return "\n".join(lines)


def contact_sheet(root: Path, m: dict, path: Path, n_groups: int, reward: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for sh in m["shards"]:
        for key, raw in iter_tar_groups(root / sh["tar"]):
            groups.append(decode_group(key, raw, sh["tar"], array_dtypes(m)))
            if len(groups) == n_groups:
                break
        if len(groups) == n_groups:
            break
    g = m["group_size"]
    fig, axes = plt.subplots(len(groups), g, figsize=(1.1 * g + 2.8, 1.3 * len(groups) + 0.5), squeeze=False)
    for r, (rec, arrays) in enumerate(groups):
        scores = rec.rewards.get(reward) if reward else None
        order = sorted(range(g), key=lambda i: -(scores[i] if scores and scores[i] is not None else -np.inf))
        for c, i in enumerate(order):
            ax = axes[r, c]
            ax.imshow(arrays[layout.image_member(i, layout.image_ext(m["image_format"]))], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            val = scores[i] if scores else None
            ax.set_xlabel("failed" if rec.status[i] != "ok" else (f"{val:.2f}" if val is not None else ""),
                          fontsize=7, labelpad=1)
        axes[r, 0].set_ylabel(rec.prompt.removeprefix("a photo of "), rotation=0, ha="right", va="center",
                              fontsize=7)
    fig.suptitle(f"{root.name}: groups sorted by {reward or 'member'} (best left)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rollout_status(root: Path) -> str:
    run_path = Path(root) / layout.RUN_CONFIG
    if not run_path.is_file():
        raise GdroError(f"{root} has no {layout.RUN_CONFIG}: no rollouts job has started there")
    ident = json.loads(run_path.read_text())["identity"]
    total = ident["num_shards"]
    stats = [ShardStats.load(p) for p in sorted((Path(root) / layout.SHARDS).glob("*.stats.json"))
             if not p.name.startswith(layout.TMP_PREFIX)]  # pathlib's * matches dot files: skip unfinished ones
    images = sum(s.images for s in stats)
    seconds = sum(s.seconds for s in stats)
    per_task: dict[int, int] = {}
    for s in stats:
        per_task[s.task_id] = per_task.get(s.task_id, 0) + 1
    lines = [f"{root}: {len(stats)}/{total} shards done, {images} images "
             f"({sum(s.failed_images for s in stats)} failed)"
             + (f", {images / seconds:.1f} images/s per task" if seconds else "")]
    lines += [f"  task {t}: {n} shards" for t, n in sorted(per_task.items())]
    in_progress = sorted(p.name for p in (Path(root) / layout.SHARDS).glob(layout.TMP_PREFIX + "*"))
    if in_progress:
        lines.append(f"  being written: {', '.join(in_progress)}")
    lines.append("  manifest: " + ("written" if (Path(root) / layout.MANIFEST).exists() else "not yet"))
    return "\n".join(lines)
