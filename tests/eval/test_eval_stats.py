"""The corrected score, the trend and the bootstrap on hand-made numbers."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.stats import (
    CorrectedConfig,
    bootstrap_indices,
    corrected_scores,
    kind_weights,
    line_means,
    ols_slope,
    overall,
    percentile_ci,
    resampled_overall,
    trailing_slopes,
    win_scores,
)


def test_overall_is_the_mean_over_kinds():
    kinds = ["a", "a", "a", "b"]
    assert overall([1, 1, 1, 0], kinds) == pytest.approx(0.5)  # kind a: 1, kind b: 0; not 3/4
    assert kind_weights(kinds).tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert line_means([1, 0, 0.5, 0.5, 1, 1], seeds=2).tolist() == [0.5, 0.5, 1.0]


def test_bootstrap_is_stratified_paired_and_deterministic():
    kinds = np.array(["a"] * 3 + ["b"] * 2)
    idx = bootstrap_indices(kinds, 500, seed=3)
    assert idx.shape == (500, 5)
    assert (kinds[idx] == kinds).all()  # every position keeps its kind
    assert np.array_equal(idx, bootstrap_indices(kinds, 500, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(kinds, 500, seed=4))
    # constant within each kind: every resample gives the same overall, a zero-width interval
    s = resampled_overall([0.2, 0.2, 0.2, 0.6, 0.6], kinds, idx)
    assert percentile_ci(s) == pytest.approx((0.4, 0.4))
    # paired: a model that is the reference + 0.1 on every line has a difference of exactly 0.1 in every resample
    ref = np.array([0.0, 1.0, 0.5, 0.25, 0.75])
    d = resampled_overall(ref + 0.1, kinds, idx) - resampled_overall(ref, kinds, idx)
    assert np.allclose(d, 0.1)


def test_bootstrap_interval_of_a_known_mean():
    """0/1 values, 200 lines, one kind, mean 0.3: the 95 % interval is about 0.3 +- 1.96 sqrt(0.21 / 200)."""
    values = np.array([1.0] * 60 + [0.0] * 140)
    kinds = ["k"] * 200
    s = resampled_overall(values, kinds, bootstrap_indices(kinds, 4000, seed=0))
    lo, hi = percentile_ci(s, 0.95)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 200)
    assert lo == pytest.approx(0.3 - half, abs=0.012) and hi == pytest.approx(0.3 + half, abs=0.012)
    assert s.mean() == pytest.approx(0.3, abs=0.005)


def test_win_scores():
    assert win_scores([0.5, 0.2, 1.0], [0.4, 0.2, 1.5]).tolist() == [1.0, 0.5, 0.0]


def test_slopes():
    assert ols_slope([0, 100, 200], [1.0, 0.9, 0.8]) == pytest.approx(-0.001)
    assert ols_slope([5], [1.0]) == 0.0
    s = trailing_slopes([0, 100, 200, 300], [1.0, 1.0, 0.8, 0.4], window=2)
    assert s.tolist() == pytest.approx([0.0, 0.0, -0.002, -0.004])
    with pytest.raises(ValueError, match="increase"):
        trailing_slopes([0, 100, 100], [1, 1, 1], 2)


def test_corrected_score_by_hand():
    """Reference: target 0.20, quality 0.50. Checkpoints at 100, 200, 300: target 0.30, 0.40, 0.50 (rising),
    quality 0.50, 0.45, 0.25 (falling late). lam 1, horizon 100, window 2.
      relative quality: 1.0, 0.9, 0.5 -> loss 0, 0.1, 0.5
      trailing slopes of (0, 1), (100, 1), (200, 0.9), (300, 0.5), two points: 0, -0.001, -0.004 per step
      projected: 0, 0.1, 0.4
      corrected = gain - (loss + projected) = 0.1 - 0 = 0.10, 0.2 - 0.2 = 0.00, 0.3 - 0.9 = -0.60"""
    r = corrected_scores([100, 200, 300], [0.3, 0.4, 0.5], 0.2, [[0.5, 0.45, 0.25]], [0.5],
                         CorrectedConfig(lam=1.0, horizon=100, window=2))
    assert r["gain"] == pytest.approx([0.1, 0.2, 0.3])
    assert r["loss"] == pytest.approx([0.0, 0.1, 0.5])
    assert r["slope"] == pytest.approx([0.0, -0.001, -0.004])
    assert r["projected"] == pytest.approx([0.0, 0.1, 0.4])
    assert r["corrected"] == pytest.approx([0.1, 0.0, -0.6])
    # the target keeps rising while the corrected score turns down
    assert np.all(np.diff(r["gain"]) > 0) and r["corrected"].argmax() == 0


def test_corrected_score_details():
    # out-of-domain gains are not rewarded, an upward trend is not extrapolated
    r = corrected_scores([50], [0.25], 0.2, [[0.6]], [0.5], CorrectedConfig(lam=2.0, horizon=100, window=3))
    assert r["loss"] == pytest.approx([0.0]) and r["projected"] == pytest.approx([0.0])
    assert r["corrected"] == pytest.approx([0.05])
    # two out-of-domain scores: losses averaged; lam scales; no steps: no trend
    r = corrected_scores(None, [0.2], 0.2, [[0.4], [1.0]], [0.5, 1.0], CorrectedConfig(lam=2.0))
    assert r["loss"] == pytest.approx([0.1]) and r["corrected"] == pytest.approx([-0.2])
    # a reference at 0 measures the out-of-domain change in absolute units
    r = corrected_scores(None, [0.2], 0.2, [[-0.3]], [0.0])
    assert r["loss"] == pytest.approx([0.3])


def test_corrected_score_broadcasts_over_resamples():
    steps = [100, 200]
    t = np.array([[0.3, 0.4], [0.2, 0.5]])  # two resamples
    o = np.array([[[0.5, 0.4], [0.5, 0.5]]])  # [J=1, B=2, M=2]
    cfg = CorrectedConfig(window=3)
    both = corrected_scores(steps, t, np.array([0.2, 0.1]), o, np.array([[0.5, 0.5]]), cfg)["corrected"]
    for b in range(2):
        one = corrected_scores(steps, t[b], 0.2 if b == 0 else 0.1, o[:, b], [0.5], cfg)["corrected"]
        assert both[b] == pytest.approx(one)


def test_default_horizon_is_one_evaluation_interval():
    """horizon 0: the trend is projected over the gap to the previous point (the reference at step 0).
    Checkpoints at 50 and 200, quality 0.45 and 0.30 of a reference 0.5, window 2:
      relative 0.9, 0.6 -> loss 0.1, 0.4; slopes -0.1/50 = -0.002, -0.3/150 = -0.002 per step
      projected over 50 and 150 steps: 0.1, 0.3; gains 0.1, 0.2 -> corrected 0.1 - 0.2 = -0.1, 0.2 - 0.7 = -0.5"""
    r = corrected_scores([50, 200], [0.3, 0.4], 0.2, [[0.45, 0.30]], [0.5], CorrectedConfig(window=2))
    assert r["slope"] == pytest.approx([-0.002, -0.002])
    assert r["projected"] == pytest.approx([0.1, 0.3])
    assert r["corrected"] == pytest.approx([-0.1, -0.5])


def _synthetic_run(target_step: float, quality_drop: list[float], lines_per_kind: int = 20, seed: int = 0):
    """A reference and checkpoints at 100..400 on 6 kinds x `lines_per_kind` lines, one image each: the
    target rises by `target_step` per checkpoint, quality falls by quality_drop[k] (of a reference 0.5), both
    with per-image noise; strict (0/1) falls with quality. The models `summarise` takes."""
    from pipeline.eval.tables import GENEVAL_KINDS as KINDS

    rng = np.random.default_rng(seed)
    kinds = [k for k in KINDS for _ in range(lines_per_kind)]
    n = len(kinds)
    models = []
    for k, drop in enumerate([0.0, *quality_drop]):
        target = 0.1 + target_step * k + rng.normal(0, 0.02, n)
        quality = 0.5 - drop + rng.normal(0, 0.02, n)
        strict = (np.arange(n) % 10 < round(8 * (0.5 - drop))).astype(float)  # 0.4 of the lines at drop 0
        models.append({"label": "reference" if k == 0 else f"step_{100 * k}", "step": 100 * k, "path": "-",
                       "scores": {"toy_color_area": target, "quality": quality, "strict": strict}})
    return models, kinds


def test_summarise_calls_a_rising_target_with_a_falling_quality_reward_hacking():
    """The mechanism of the hacking demonstration (docs/evaluation.md, "Reward hacking, caught") on made-up
    scores: the target keeps rising, quality falls faster and faster -> verdict 'reward hacking', the corrected
    score peaks early and turns down (significantly below its peak at the end), the best model is the early one.
    The control: the same target gains with quality unchanged -> 'improvement', corrected = gain."""
    from pipeline.config import EvalConfig
    from pipeline.eval.report import summarise

    e = EvalConfig(target="toy_color_area", rewards=["toy_color_area"], out_of_domain=["quality", "strict"],
                   bootstrap=300)
    models, kinds = _synthetic_run(0.05, [0.0, 0.05, 0.15, 0.3])
    s = summarise(models, kinds, 1, e)
    trained = s["models"][1:]
    gain = [m["gain"]["value"] for m in trained]
    corr = [m["corrected"]["value"] for m in trained]
    assert np.all(np.diff(gain) > 0) and trained[-1]["gain"]["ci"][0] > 0
    assert s["trend"]["verdict"].startswith("reward hacking")
    assert s["trend"]["target_per_1000"]["ci"][0] > 0 > s["trend"]["out_of_domain_rel_per_1000"]["ci"][1]
    assert int(np.argmax(corr)) <= 1 and corr[-1] < 0 and trained[-1]["corrected"]["ci"][1] < max(corr)
    assert s["best"] == trained[int(np.argmax(corr))]["label"]

    models, kinds = _synthetic_run(0.05, [0.0, 0.0, 0.0, 0.0])
    s = summarise(models, kinds, 1, e)
    assert s["trend"]["verdict"].startswith("improvement")
    trained = s["models"][1:]
    assert s["best"] == trained[-1]["label"]
    for m in trained:  # only noise-sized out-of-domain losses: corrected within a few points of the gain
        assert m["corrected"]["value"] == pytest.approx(m["gain"]["value"], abs=0.05)
