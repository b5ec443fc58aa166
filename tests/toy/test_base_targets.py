"""The base-model checks `gdro toy score` prints, on hand-made tables, and the true renders they compare with."""
from pathlib import Path

import numpy as np

from pipeline.prompt_files import load_prompts
from pipeline.toy.scoring import base_target_checks, true_render_scores

REPO = Path(__file__).resolve().parents[2]


def _table(strict, single, quality):
    return {"strict": {"single_object": single, "overall": strict}, "quality": {"overall": quality}}


def test_checks_on_hand_made_tables():
    assert [met for _, _, met in base_target_checks(_table(0.40, 0.90, 0.76), 0.95)] == [True, True, True]
    checks = base_target_checks(_table(0.60, 0.84, 0.75), 0.95)  # 0.75 / 0.95 = 0.789 < 0.8
    assert [met for _, _, met in checks] == [False, False, False]
    assert abs(checks[2][1] - 0.75 / 0.95) < 1e-12
    assert [met for _, _, met in base_target_checks(_table(0.25, 0.85, 0.8), 1.0)] == [True, True, True]  # edges


def test_true_renders_pass_and_are_seeded():
    metas = load_prompts(REPO / "prompts" / "toy_test.jsonl")[:30]
    a, b = true_render_scores(metas), true_render_scores(metas)
    assert a["strict"].mean() == 1.0 and np.array_equal(a["quality"], b["quality"])
    assert not np.array_equal(a["quality"], true_render_scores(metas, seed=1)["quality"])
