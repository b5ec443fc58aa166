"""The numbers behind `gdro eval`: overall scores (mean over kinds), a paired, kind-stratified bootstrap over
prompts, win rates on the same noise, the out-of-domain trend and our corrected score. Pure numpy.

The corrected score is our own formula (the GDRO paper names a "corrected score" that accounts for the trend
of reward hacking but publishes no formula). With T the target score, O_j the out-of-domain scores, ref the
reference model evaluated on the same prompts and noise, and checkpoints at training steps s_1 < s_2 < ...:

    gain_k      = T_k - T_ref
    loss_k      = mean_j max(0, 1 - O_jk / O_jref)                       relative out-of-domain loss, now
    slope_k     = mean_j OLS slope of O_j / O_jref over the last `window` points up to s_k (the reference is
                  the point (0, 1)), per step                            the hacking trend at s_k
    projected_k = h_k * max(0, -slope_k)                                  the loss that trend adds in h_k more steps
    corrected_k = gain_k - lam * (loss_k + projected_k)

h_k is `horizon` steps, or with horizon 0 (the default) one evaluation interval, s_k - s_{k-1} (s_0 = 0, the
reference): projected_k is then the further loss expected at the next evaluation if the present trend goes on.

`lam` is an exchange rate: target points given up per unit of relative out-of-domain loss (1: losing 10 % of
the reference's quality costs 0.10 of accuracy). Out-of-domain gains are not rewarded, only losses counted.
A model with no known step (a folder outside a run) gets no trend term.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-8


# ------------------------------------------------------------------------------------- overall and bootstrap
def line_means(values: np.ndarray, seeds: int) -> np.ndarray:
    """Per-image values [lines * seeds] (member-major within a line) -> per-line means [lines]."""
    return np.asarray(values, np.float64).reshape(-1, seeds).mean(1)


def kind_weights(kinds) -> np.ndarray:
    """[N] weights 1 / (K n_k): sum(w * v) is the mean over the K kinds of the per-kind means (GenEval's
    overall), whatever the kinds' counts."""
    kinds = np.asarray(kinds)
    names, inverse, counts = np.unique(kinds, return_inverse=True, return_counts=True)
    return 1.0 / (len(names) * counts[inverse])


def overall(values: np.ndarray, kinds) -> np.ndarray:
    """Mean over kinds of per-kind means, along the last axis of `values` [..., N]."""
    return (np.asarray(values, np.float64) * kind_weights(kinds)).sum(-1)


def bootstrap_indices(kinds, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, N] resampled line indices, stratified by kind: position j always holds a line of j's kind, so
    each resample has the same kind counts and `kind_weights` still apply. Use the same indices for every
    model and metric: the resamples are paired (differences between models keep their pairing)."""
    kinds = np.asarray(kinds)
    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, len(kinds)), np.int64)
    for name in sorted(set(kinds.tolist())):
        members = np.flatnonzero(kinds == name)
        idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return idx


def resampled_overall(values: np.ndarray, kinds, idx: np.ndarray) -> np.ndarray:
    """values [..., N] -> the overall score of every resample [..., n_boot]."""
    v = np.asarray(values, np.float64)
    return (v[..., idx] * kind_weights(kinds)).sum(-1)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (last axis)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(samples, np.float64), [a, 1.0 - a], axis=-1)
    return float(lo), float(hi)


def win_scores(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image on the same noise: 1 if the policy scores higher, 0.5 on a tie, 0 if lower."""
    p, r = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    return np.where(p > r, 1.0, np.where(p == r, 0.5, 0.0))


# ----------------------------------------------------------------------------------- trend, corrected score
@dataclass
class CorrectedConfig:
    lam: float = 1.0  # target points per unit of relative out-of-domain loss
    horizon: float = 0.0  # steps the present out-of-domain trend is projected ahead; 0 = one evaluation interval
    window: int = 3  # evaluated points (reference included) the trend is fitted on


def ols_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y [..., P] on x [P]; 0 for fewer than two points."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return np.zeros(np.shape(y)[:-1])
    xc = x - x.mean()
    y = np.asarray(y, np.float64)
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc**2).sum()


def trailing_slopes(steps, y: np.ndarray, window: int) -> np.ndarray:
    """y [..., P] at increasing steps [P] -> [..., P]: the slope over the last `window` points ending at each."""
    steps = np.asarray(steps, np.float64)
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"steps must increase strictly, got {steps.tolist()}")
    y = np.asarray(y, np.float64)
    out = [ols_slope(steps[max(0, k - window + 1):k + 1], y[..., max(0, k - window + 1):k + 1])
           for k in range(len(steps))]
    return np.stack(out, -1)


def corrected_scores(steps, target, target_ref, ood, ood_ref, cfg: CorrectedConfig | None = None) -> dict:
    """The corrected score of a series of checkpoints (module docstring).

    steps [M] (increasing, > 0) or None (no trend); target [..., M]; target_ref [...]; ood [J, ..., M];
    ood_ref [J, ...]. Leading axes (...) broadcast, so bootstrap resamples go through in one call.
    Returns arrays [..., M]: gain, loss, slope (relative out-of-domain per step), projected, corrected."""
    cfg = cfg or CorrectedConfig()
    target = np.asarray(target, np.float64)
    ood = np.asarray(ood, np.float64)
    ood_ref = np.asarray(ood_ref, np.float64)[..., None]
    scale = np.where(np.abs(ood_ref) > EPS, np.abs(ood_ref), 1.0)  # a reference at 0: absolute units
    rel = 1.0 + (ood - ood_ref) / scale  # O / O_ref (1 at the reference)
    gain = target - np.asarray(target_ref, np.float64)[..., None]
    loss = np.clip(1.0 - rel, 0.0, None).mean(0)
    if steps is None:
        slope, horizon = np.zeros_like(gain), 0.0
    else:
        ones = np.ones(rel.shape[:-1] + (1,))
        full = np.concatenate([ones, rel], -1)  # the reference is the point (0, 1)
        slope = trailing_slopes([0, *steps], full, cfg.window)[..., 1:].mean(0)
        horizon = cfg.horizon if cfg.horizon > 0 else np.diff(np.asarray([0, *steps], np.float64))
    projected = horizon * np.clip(-slope, 0.0, None)
    return {"gain": gain, "loss": loss, "slope": slope, "projected": projected,
            "corrected": gain - cfg.lam * (loss + projected)}
