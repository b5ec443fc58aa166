"""`gdro eval` on a real backend: a tiny random SD3 pipeline, a registered reward as the target (`pickscore` on
a tiny local CLIPModel) and another as the out-of-domain score (`clip_score` on a tiny local open_clip model),
both also used in stage one. The reference and each DeepSpeed checkpoint load through the backend registry
(`pipeline.checkpoints.load_model` -> `backend_from_config`); the reference's score is checked against images
drawn by diffusers' own StableDiffusion3Pipeline from the same noise, scored independently."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gdro_testing import run_train

pytestmark = pytest.mark.slow

PROMPTS = ['a sign that says "open"', 'a mug printed with "hello"', 'a neon sign "late"', 'a poster "gdro"']
EVAL_PROMPTS = ["a polar bear in the snow", "a tiny house in a bottle", "an owl on a lantern"]
G, MAX_LEN, GUIDANCE, SHIFT, STEPS, BASE_SEED = 4, 8, 4.5, 3.0, 2, 777


def overrides(root: Path, oc: dict, clip: Path, run: str = "run") -> list[str]:
    rewards = {"ocr": {}, "pickscore": {"path": str(clip)},
               "clip_score": {"model": oc["name"], "pretrained": str(oc["weights"]),
                              "model_config": str(oc["model_config"])}}
    return [f"model.path={root / 'model'}", "model.dtype=float32", "model.resolution=32",
            f"model.max_sequence_length={MAX_LEN}", f"sampler.guidance={GUIDANCE}", f"sampler.shift={SHIFT}",
            f"sampler.steps={STEPS}", f"rollouts.prompts={root / 'train.txt'}", f"rollouts.out={root / 'dataset'}",
            "rollouts.num_prompts=0", "rollouts.prompts_per_shard=2", f"rollouts.group_size={G}",
            "rollouts.batch_size=8", "rollouts.ref_cache_k=2", f"rollouts.rewards={json.dumps(rewards)}",
            f"train.dataset={root / 'dataset'}", f"train.out={root / run}", 'train.reward_weights={"pickscore": 1.0}',
            "train.groups_per_step=2", "train.steps=2", "train.save_every=1", "train.keep_checkpoints=2",
            "train.num_workers=0", "train.lora_rank=0", "train.reference=cache", "train.kl_beta=0", "train.lr=1e-2",
            "train.beta=50", f"eval.prompts={root / 'test.txt'}", "eval.rewards=[pickscore, clip_score]",
            "eval.target=pickscore", "eval.out_of_domain=[clip_score]", f"eval.base_seed={BASE_SEED}",
            "eval.bootstrap=50", "eval.batch_size=4"]


def set_args(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.backends.tiny import build_tiny_clip_model, build_tiny_open_clip, build_tiny_sd3
    from pipeline.cli import main as cli
    from pipeline.config import ExperimentConfig, resolve

    pytest.importorskip("open_clip", reason="open_clip_torch is a gdro dependency (pip install -e .)")
    root = tmp_path_factory.mktemp("real_eval")
    build_tiny_sd3(root / "model")
    clip = build_tiny_clip_model(root / "pickscore")
    oc = build_tiny_open_clip(root / "open_clip")
    (root / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "test.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    items = overrides(root, oc, clip)
    assert cli(["rollouts", "--preset", "sd35_pickscore", *set_args(items)]) == 0
    run = run_train(resolve(ExperimentConfig, preset="sd35_pickscore", overrides=items))
    return {"root": root, "clip": clip, "oc": oc, "items": items, "run": run}


def test_stage_one_scored_every_reward_and_the_manifest_names_them(world):
    from importlib.metadata import version

    import pyarrow.parquet as pq

    m = json.loads((world["root"] / "dataset" / "manifest.json").read_text())
    rewards = {r["name"]: r for r in m["rewards"]}
    assert set(rewards) == {"ocr", "pickscore", "clip_score"}
    assert rewards["ocr"]["params"] == {"backend": "rapidocr", "backend_version": version("rapidocr")}
    assert rewards["clip_score"]["params"]["open_clip_version"] == version("open_clip_torch")
    assert rewards["pickscore"]["params"]["path"] == str(world["clip"])
    table = pq.read_table(world["root"] / "dataset" / "shards" / "000000.parquet").to_pandas()
    assert (table["status"] == "ok").all() and len(table) == 2 * G
    assert table["reward_ocr"].between(0, 1).all()  # tiny random images: whatever OCR reads, the rule's range
    assert table["reward_pickscore"].nunique() > 1


def test_eval_of_a_real_backend_with_registered_rewards(world, capsys):
    from pipeline.cli import main as cli

    assert cli(["eval", "--preset", "sd35_pickscore", *set_args(world["items"])]) == 0
    out = world["run"] / "eval"
    res = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in res["models"]] == ["reference", "step 1", "step 2"]
    assert res["metrics"] == ["pickscore", "clip_score"] and res["target"] == "pickscore"  # no toy verifier scores
    for m in res["models"]:
        assert set(m["overall"]) == {"pickscore", "clip_score"}
        assert all(np.isfinite(m["overall"][k]["value"]) for k in m["overall"])
    values = [m["overall"]["pickscore"]["value"] for m in res["models"]]
    assert len(set(values)) == 3  # the checkpoints' weights were loaded: each model draws other images
    assert (out / "report.md").is_file() and (out / "grid_step_2.png").is_file()
    printed = capsys.readouterr().out
    assert "pickscore" in printed and "clip_score (out-of-domain)" in printed
    world["results"] = res


def test_the_reference_score_equals_diffusers_images_scored_independently(world):
    """Eval's reference pickscore = the mean of the CLIPModel's own logits on the images diffusers'
    StableDiffusion3Pipeline draws from eval's noise (line i: noise_for(member_seed(base_seed, i, 0)))."""
    import diffusers
    from transformers import CLIPModel, CLIPProcessor

    from schemas.seeds import member_seed, noise_for

    if "results" not in world:
        pytest.skip("needs test_eval_of_a_real_backend_with_registered_rewards")
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(world["root"] / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=SHIFT)
    noise = torch.stack([noise_for(member_seed(BASE_SEED, i, 0), (4, 16, 16)) for i in range(len(EVAL_PROMPTS))])
    images = pipe(EVAL_PROMPTS, num_inference_steps=STEPS, height=32, width=32, guidance_scale=GUIDANCE,
                  max_sequence_length=MAX_LEN, latents=noise, output_type="np").images
    images = (images * 255).round().astype(np.uint8)
    model = CLIPModel.from_pretrained(world["clip"], local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(world["clip"], local_files_only=True)
    with torch.no_grad():
        logits = [float(model(**proc(text=[p], images=[img], return_tensors="pt")).logits_per_image[0, 0])
                  for p, img in zip(EVAL_PROMPTS, images)]
    ref = world["results"]["models"][0]["overall"]["pickscore"]["value"]
    assert ref == pytest.approx(np.mean(logits), rel=1e-3, abs=1e-3)


def test_eval_refuses_toy_scores_for_a_real_backend(world):
    from pipeline.config import ExperimentConfig, resolve
    from pipeline.errors import GdroError
    from stages.evaluate import main

    cfg = resolve(ExperimentConfig, preset="sd35_pickscore",
                  overrides=[*world["items"], "eval.target=strict"])
    with pytest.raises(GdroError, match=r"eval.target: 'strict' is not scored for the sd3 backend"):
        main(cfg)
