"""`gdro eval` over a run on a tiny random toy model: checkpoint weights read in place (ZeRO-2 and LoRA) equal the
export, the report and its pictures are written, and two evaluations give identical numbers.

The tiny run: 8 prompts x G = 4 scored by a user reward (the mean pixel value, so groups have spread), 4 DeepSpeed
steps with checkpoints at 2 and 4. Sampling uses 2 Euler steps and 12 prompt lines: seconds, not minutes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gdro_testing import MEAN_PIXEL_MODULE, run_train, transformer_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
REWARD = "gdro_eval_reward:mean_pixel"
REWARD_MODULE = MEAN_PIXEL_MODULE


def make_cfg(model, root: Path, run: str, *overrides):
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={model}", f"rollouts.out={root / 'data'}", f"rollouts.prompts={REPO / 'prompts/toy_train.jsonl'}",
        "rollouts.num_prompts=8", "rollouts.prompts_per_shard=8", "rollouts.group_size=4", "sampler.steps=2",
        f'rollouts.rewards={{"{REWARD}": {{}}}}', f"train.dataset={root / 'data'}", f"train.out={root / run}",
        f'train.reward_weights={{"{REWARD}": 1.0}}', "train.groups_per_step=4", "train.lr=1e-3",
        "train.warmup_steps=1", "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3",
        f"eval.prompts={REPO / 'prompts/toy_test.jsonl'}", "eval.num_prompts=12", "eval.bootstrap=200",
        "eval.grid_per_kind=1", *overrides])


@pytest.fixture(scope="module")
def runs(tiny_toy_model, tmp_path_factory):
    from stages.rollouts import main as rollouts

    root = tmp_path_factory.mktemp("eval_e2e")
    (root / "reward_mod").mkdir()
    (root / "reward_mod" / "gdro_eval_reward.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "reward_mod"))
        rollouts(make_cfg(tiny_toy_model, root, "unused"))
        full = run_train(make_cfg(tiny_toy_model, root, "full"))
        lora = run_train(make_cfg(tiny_toy_model, root, "lora", "train.steps=2", "train.lora_rank=4",
                                  "train.lora_alpha=8", "train.lr=1e-2"))
        select = run_train(make_cfg(tiny_toy_model, root, "select", "train.steps=8", "train.save_every=2",
                                    "train.keep_checkpoints=4", "train.eval_every=2", "train.eval_num_prompts=6",
                                    "train.patience=1", "eval.target=partial", "train.ema_decay=0.5"))
    return {"root": root, "full": full, "lora": lora, "select": select, "model": tiny_toy_model}


def test_checkpoint_weights_equal_the_export(runs):
    """The last DeepSpeed checkpoint, read in place (weights_only, no pickle code), holds the exported weights;
    a LoRA checkpoint merged by W + alpha / r B A equals peft's merged export."""
    from pipeline.checkpoints import deepspeed_state_dict
    from pipeline.runs import run_models

    refs = run_models(runs["full"])
    assert [(r.label, r.step, r.kind) for r in refs] == [("step 2", 2, "deepspeed"), ("step 4", 4, "deepspeed")]
    for name in ("full", "lora"):
        ck = max((runs[name] / "checkpoints").glob("step_*"))
        got, want = deepspeed_state_dict(ck), transformer_weights(runs[name] / "export")
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    first = deepspeed_state_dict(runs["full"] / "checkpoints" / "step_0000002")
    assert any(not torch.equal(first[k], transformer_weights(runs["full"] / "export")[k]) for k in first)  # step 2 != step 4


def test_eval_writes_the_report_and_is_deterministic(runs):
    from PIL import Image

    from stages.evaluate import main as evaluate

    a = evaluate(make_cfg(runs["model"], runs["root"], "full", f"eval.out={runs['root'] / 'eval_a'}"))
    b = evaluate(make_cfg(runs["model"], runs["root"], "full", f"eval.out={runs['root'] / 'eval_b'}"))
    out_a, out_b = runs["root"] / "eval_a", runs["root"] / "eval_b"
    assert (out_a / "results.json").read_bytes() == (out_b / "results.json").read_bytes()
    assert a == b
    assert [m["label"] for m in a["models"]] == ["reference", "step 2", "step 4"]
    assert [m["step"] for m in a["models"]] == [0, 2, 4]
    for m in a["models"][1:]:
        assert set(m) >= {"overall", "table", "win_rate", "gain", "corrected", "slope_per_1000"}
        lo, hi = m["corrected"]["ci"]
        assert lo <= m["corrected"]["value"] <= hi
        assert 0.0 <= m["win_rate"]["strict"]["value"] <= 1.0
    assert a["trend"]["steps"] == [0, 2, 4] and a["trend"]["verdict"]
    assert a["best"] in ("step 2", "step 4")
    for name in ("report.md", "report.html", "curves.png", "grid_all.png", "grid_step_2.png", "grid_step_4.png"):
        assert (out_a / name).is_file(), name
    for png in out_a.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 500 and im.size[1] > 200
    md = (out_a / "report.md").read_text()
    assert "](curves.png)" in md and "](grid_step_4.png)" in md and "corrected" in md
    assert json.loads((out_a / "results.json").read_text())["figures"]["curves"] == "curves.png"


def test_eval_of_one_folder(runs):
    """eval.checkpoint: the reference and that folder only, no trend."""
    from stages.evaluate import main as evaluate

    r = evaluate(make_cfg(runs["model"], runs["root"], "full", f"eval.checkpoint={runs['full'] / 'export'}",
                          f"eval.out={runs['root'] / 'eval_one'}", "eval.bootstrap=0"))
    assert [m["step"] for m in r["models"]] == [0, None]
    assert r["trend"] is None and r["models"][1]["corrected"]["ci"] is None
    assert r["models"][1]["label"] == "full/export"
    assert [p.name for p in (runs["root"] / "eval_one").glob("grid_*.png")] == ["grid_full_export.png"]


def test_decide_by_hand():
    from pipeline.eval.selection import decide

    h = [{"corrected": v} for v in (0.0, 0.1, 0.05)]
    assert decide(h[:1], 1) == (True, False)  # the first evaluation is the best so far
    assert decide(h[:2], 1) == (True, False)
    assert decide(h, 1) == (False, True)  # one evaluation without a better score: stop with patience 1
    assert decide(h, 2) == (False, False)
    assert decide(h, 0) == (False, False)  # patience 0: never stop
    assert decide(h + [{"corrected": 0.1}], 0) == (False, False)  # a tie is not better


def test_selection_during_training_keeps_the_best_and_stops(runs):
    """train.eval_every=2, patience 1: one line per evaluation in selection.jsonl (the reference first), the
    best model in best/ equal to the checkpoint of its step, and training stops exactly when `decide` says. The
    run keeps an EMA (train.ema_decay=0.5): best/ and the checkpoint as read for `gdro eval` are both the average."""
    from safetensors.torch import load_file

    from pipeline.checkpoints import deepspeed_state_dict
    from pipeline.eval.selection import decide
    from stages.evaluate import main as evaluate

    run = runs["select"]
    recs = [json.loads(x) for x in (run / "selection.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and recs[0]["reference"] and recs[0]["lines"] == 6
    evals = recs[1:]
    assert [r["step"] for r in evals] == list(range(2, 2 * len(evals) + 1, 2)) and evals
    for i, r in enumerate(evals):
        is_best, stop = decide(evals[: i + 1], 1)
        assert r["best"] == is_best
        assert stop == (i == len(evals) - 1 and r["step"] < 8)
    last_step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last_step == evals[-1]["step"]
    assert (run / "export").is_dir()
    best_step = max(r["step"] for r in evals if r["best"])
    info = json.loads((run / "best" / "best.json").read_text())
    assert info["step"] == best_step
    best = load_file(str(run / "best" / "transformer" / "diffusion_pytorch_model.safetensors"))
    ck = deepspeed_state_dict(run / "checkpoints" / f"step_{best_step:07d}")
    for k in ck:
        torch.testing.assert_close(best[k], ck[k])
    r = evaluate(make_cfg(runs["model"], runs["root"], "select", f"eval.out={runs['root'] / 'eval_select'}",
                          "eval.bootstrap=50", "eval.target=partial"))
    assert r["figures"]["selection"] == "selection.png"
    assert (runs["root"] / "eval_select" / "selection.png").is_file()
