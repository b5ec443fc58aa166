"""The whole comparison, end to end on a tiny task (2 rounds of 2 training steps, 1 online iteration per method):
the one command writes its table, its figure and the docs block; the numbers it reports are its curves'."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from gdro_testing import MEAN_PIXEL_MODULE

REPO = Path(__file__).resolve().parents[2]
REWARD = "gdro_cmp_reward:mean_pixel"
REWARD_MODULE = MEAN_PIXEL_MODULE


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_and_fills_the_docs(tiny_toy_model, tmp_path, monkeypatch):
    from pipeline.config import ExperimentConfig, resolve
    from stages.offline_vs_online import BEGIN, END, main, time_to_fraction

    (tmp_path / "reward_mod").mkdir()
    (tmp_path / "reward_mod" / "gdro_cmp_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "reward_mod"))
    docs = tmp_path / "docs"
    (docs / "img").mkdir(parents=True)
    shutil.copyfile(REPO / "docs" / "offline_vs_online.md", docs / "offline_vs_online.md")
    cfg = resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={tiny_toy_model}", f"rollouts.prompts={REPO / 'prompts/toy_train.jsonl'}",
        "rollouts.num_prompts=4", "rollouts.group_size=4", "sampler.steps=2", "rollouts.ref_cache_k=1",
        f'rollouts.rewards={{"{REWARD}": {{}}}}', f'train.reward_weights={{"{REWARD}": 1.0}}',
        "train.groups_per_step=2", "train.lr=1e-3", "train.warmup_steps=1", "train.steps=2", "train.save_every=1",
        "train.keep_checkpoints=5", "train.beta=20", f"eval.prompts={REPO / 'prompts/toy_test.jsonl'}",
        "eval.num_prompts=3", "eval.bootstrap=0", "online.iterations=1", "online.groups=2", "online.eval_every=1"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        text = main(cfg, out=tmp_path / "cmp", n_rounds=2, ceiling=Path(tiny_toy_model), docs=docs)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)

    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(res["methods"]) == {"offline gdro", "offline rounds (1-2)", "offline nft", "online DGPO",
                                   "online NFT", "online Flow-GRPO"}
    off = res["methods"]["offline gdro"]["curve"]
    assert [p.get("step") for p in off] == [None, None, 1, 2]  # base at 0, base until stage one ends, checkpoints
    assert off[1]["wall_s"] > 0 and all(a["wall_s"] <= b["wall_s"] for a, b in itertools.pairwise(off))
    assert res["served"] == [f"gdro ({cfg.train.loss})", "nft"]  # the preset's loss, then the extra one
    for row in res["summary"]["rows"]:
        assert row["t90_s"] == time_to_fraction(res["methods"][row["method"]]["curve"], "strict")
        # the interval's evaluation (`gdro eval` of the final model folder) scores what the curve's last point says
        assert res["methods"][row["method"]]["final_gain"]["value"] == pytest.approx(row["gain"], abs=1e-9)
        assert f"| {row['method']} |" in text
    page = (docs / "offline_vs_online.md").read_text()
    assert "Not run yet" not in page and BEGIN in page and END in page and "img/offline_vs_online.png" in page
    assert (docs / "img" / "offline_vs_online.png").stat().st_size > 0
    # rerun: everything is read back, nothing retrained (the points are cached; the rounds are done)
    again = main(cfg, out=tmp_path / "cmp", n_rounds=2, ceiling=Path(tiny_toy_model))
    assert again == text


def test_time_to_ninety_percent():
    from stages.offline_vs_online import time_to_fraction

    curve = [{"wall_s": 0, "s": 0.4}, {"wall_s": 10, "s": 0.45}, {"wall_s": 20, "s": 0.48}, {"wall_s": 30, "s": 0.5}]
    assert time_to_fraction(curve, "s") == 30  # 0.48 - 0.4 = 0.08 < 0.9 x 0.1
    curve[2]["s"] = 0.495
    assert time_to_fraction(curve, "s") == 20
    assert time_to_fraction([{"wall_s": 0, "s": 0.4}, {"wall_s": 5, "s": 0.3}], "s") is None


def test_the_table_shows_each_final_gain_with_its_interval():
    from stages.offline_vs_online import format_table, summarise

    base = {"wall_s": 0, "strict": 0.4, "quality": 0.8}
    methods = {"offline gdro": {"curve": [base, {"wall_s": 10, "strict": 0.45, "quality": 0.79}], "images": 8,
                                "final_gain": {"value": 0.05, "ci": [0.01, 0.09]}},
               "online DGPO": {"curve": [base, {"wall_s": 5, "strict": 0.42, "quality": 0.8}], "images": 16}}
    summary = summarise(methods, "strict", "quality")
    text = format_table(summary, "strict", "quality", None, ["gdro (dpo)"])
    assert "| offline gdro | 0.450 | +0.050 [+0.010, +0.090] | 0.790 (-0.010) | 10 | 10 | 8 |" in text
    assert "| online DGPO | 0.420 | +0.020 | 0.800 (+0.000) | 5 | 5 | 16 |" in text  # no interval: none shown
    assert summary["t90_ratio_offline_over_online_dgpo"] == 2.0
