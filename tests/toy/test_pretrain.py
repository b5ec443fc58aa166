"""The toy pre-training recipe: runs, learns (loss falls), saves a loadable model, logs evaluations, resumes to
the same weights as an uninterrupted run, and draws noisy-caption pairs at the configured rate."""
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from pipeline.backends.toy import ToyBackend
from pipeline.config import ToyPretrainConfig
from pipeline.errors import GdroError
from pipeline.toy.prompts import all_prompts, perturb, sample_scene
from pipeline.toy.verifier import verify
from pipeline.toy.world import render
from stages.toy_pretrain import main


def _tiny(out, **kw) -> ToyPretrainConfig:
    base = {"out": str(out), "steps": 60, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5, "text_dim": 32,
            "unet_channels": [8, 16, 32], "head_dim": 8, "eval_every": 60, "eval_n": 6, "eval_sampler_steps": 2,
            "keep_every": 0, "threads": 1, "state_every": 3}
    return ToyPretrainConfig(**{**base, **kw})


def test_pretrain_learns_and_saves(tmp_path):
    out = main(_tiny(tmp_path / "m"))
    log = [json.loads(l) for l in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and "eval" in log[-1]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.7 * first  # it learns the rendered scenes' statistics
    backend = ToyBackend.from_pretrained(out)
    assert type(backend.transformer).__name__ == "UNet2DConditionModel"
    assert list(backend.transformer.config.block_out_channels) == [8, 16, 32]
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == 60


def test_sd3_denoiser_still_trains(tmp_path):
    out = main(_tiny(tmp_path / "m", steps=3, denoiser="sd3", layers=1, heads=2, head_dim=16, eval_every=3))
    assert type(ToyBackend.from_pretrained(out).transformer).__name__ == "SD3Transformer2DModel"


def test_resume_equals_uninterrupted(tmp_path):
    """6 steps straight == 3 steps, stop, rerun to 6 (the state at step 3 carries weights, EMA, AdamW moments,
    scheduler and both RNGs; evaluation cadence may change on resume); the log holds each step once."""
    straight = main(_tiny(tmp_path / "a", steps=6, eval_every=100))
    main(_tiny(tmp_path / "b", steps=3, eval_every=2))  # an evaluation in between draws from no training RNG
    resumed = main(_tiny(tmp_path / "b", steps=6, eval_every=100))
    for sub in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(straight / sub)), load_file(str(resumed / sub))
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k].numpy(), b[k].numpy()), (sub, k)
    steps = [json.loads(l)["step"] for l in (resumed / "pretrain_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_settings(tmp_path):
    main(_tiny(tmp_path / "m", steps=3, eval_every=100))
    with pytest.raises(GdroError, match="caption_noise"):
        main(_tiny(tmp_path / "m", steps=6, eval_every=100, caption_noise=0.9))


def test_perturbed_scenes_fail_their_caption_and_stay_drawable():
    """Every perturbation of a compositional prompt draws a scene the verifier rejects for the original caption
    (one fact is wrong) and accepts for the perturbed metadata (it is drawable); single objects stay clean."""
    rng = np.random.default_rng(0)
    for meta in all_prompts():
        for _ in range(2):
            other = perturb(meta, rng)
            img = render(sample_scene(other, rng))
            assert verify(img, other)[0].strict, other
            assert verify(img, meta)[0].strict == (meta["tag"] == "single_object"), (meta, other)
