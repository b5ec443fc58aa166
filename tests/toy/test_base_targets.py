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


def test_score_samples_with_the_presets_sampler_unless_told(monkeypatch):
    """`gdro toy score` checks the base as rollouts and `gdro eval` sample it: the toy preset's sampler (here made
    guided, 4 steps, so that a fixed default would show), with --steps / --guidance overriding one field each."""
    import dataclasses

    from click.testing import CliRunner

    from pipeline import cli
    from pipeline.eval import fixed_noise

    real = cli._experiment

    def guided(preset, files, overrides, **kw):
        cfg = real(preset, files, overrides, **kw)
        return dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, steps=4, guidance=3.0, shift=2.0))

    seen = []

    def fake_sample(backend, metas, sampler, base_seed):
        seen.append(sampler)
        return np.zeros((len(metas), 32, 32, 3), np.uint8)

    monkeypatch.setattr(cli, "_experiment", guided)
    monkeypatch.setattr(fixed_noise, "sample_prompt_set", fake_sample)
    args = ["toy", "score", "--model", str(REPO / "models" / "toy-base"), "--limit", "2",
            "--prompts", str(REPO / "prompts" / "toy_test.jsonl")]
    for extra in ([], ["--guidance", "1.5"], ["--steps", "8"]):
        r = CliRunner().invoke(cli.cli, args + extra)
        assert r.exit_code == 0, r.output
    assert [(s.steps, s.guidance, s.shift) for s in seen] == [(4, 3.0, 2.0), (4, 1.5, 2.0), (8, 3.0, 2.0)]
    assert "(4 Euler steps, guidance 3)" in CliRunner().invoke(cli.cli, args).output
