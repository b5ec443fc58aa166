"""The toy pre-training recipe: runs, learns (loss falls), saves a loadable model, logs evaluations, resumes to
the same weights as an uninterrupted run, and draws noisy-caption pairs at the configured rate."""
import collections
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.backends.toy import ToyBackend
from pipeline.config import ToyPretrainConfig
from pipeline.errors import GdroError
from pipeline.toy.prompts import KINDS, NOISY_KINDS, CaptionNoise, all_prompts, noisy_scene, perturb, sample_scene
from pipeline.toy.verifier import verify
from pipeline.toy.world import COLORS, from_unit, render
from stages.toy_pretrain import _batch, main


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


@pytest.mark.parametrize("relation", ["other", "opposite"])
def test_perturbed_scenes_fail_their_caption_and_stay_drawable(relation):
    """Every perturbation of a compositional prompt is drawable (the verifier accepts the scene for the perturbed
    metadata), and a noisy scene always fails the original caption; single objects stay clean."""
    rng = np.random.default_rng(0)
    for meta in all_prompts():
        for _ in range(2):
            other = perturb(meta, rng, CaptionNoise(relation=relation))
            assert verify(render(sample_scene(other, rng)), other)[0].strict, other
            if meta["tag"] != "single_object":
                assert not verify(render(noisy_scene(meta, rng, CaptionNoise(relation=relation))), meta)[0].strict, meta


def test_a_noisy_relation_is_another_side():
    """"other": every other side appears and the caption's never does, so at any noise rate below 3/4 the
    caption's side stays the likeliest; "opposite": always the opposite side (at rate 1/2 the caption says
    nothing about the side, the first base's flaw)."""
    rng = np.random.default_rng(1)
    meta = next(p for p in all_prompts() if p["tag"] == "position" and p["include"][1]["position"][0] == "left of")
    drawn = collections.Counter(perturb(meta, rng)["include"][1]["position"][0] for _ in range(300))
    assert set(drawn) == {"right of", "above", "below"} and min(drawn.values()) > 70
    assert {perturb(meta, rng, CaptionNoise(relation="opposite"))["include"][1]["position"][0] for _ in range(20)} == {"right of"}


def test_a_noisy_count_is_one_sided_with_count_up_or_down():
    """"either": n - 1 and n + 1 both appear (within 1..4), so the caption's count stays the mode of the drawn
    counts at any rate; "up": always n + 1 (n - 1 at the world's largest count), so above rate 1/2 the mode is off;
    "down": always n - 1 (an omission)."""
    rng = np.random.default_rng(3)
    for n, up, down, either in ((2, {3}, {1}, {1, 3}), (3, {4}, {2}, {2, 4}), (4, {3}, {3}, {3})):
        meta = next(p for p in all_prompts() if p["tag"] == "counting" and p["include"][0]["count"] == n)
        assert {perturb(meta, rng, CaptionNoise(count="up"))["include"][0]["count"] for _ in range(40)} == up, n
        assert {perturb(meta, rng, CaptionNoise(count="down"))["include"][0]["count"] for _ in range(40)} == down, n
        assert {perturb(meta, rng)["include"][0]["count"] for _ in range(40)} == either, n
        for how, drawn in (("up", up), ("down", down)):
            for _ in range(5):  # the drawn scene has the perturbed count, which fails the caption
                scene = noisy_scene(meta, rng, CaptionNoise(count=how))
                assert sum(o.shape == meta["include"][0]["class"] for o in scene) in drawn
                assert not verify(render(scene), meta)[0].strict


def test_pretraining_pairs_are_noisy_at_the_configured_rate_on_the_noisy_kinds_only():
    """Brute force over the pairs `_batch` draws: a pair is noisy exactly when its image fails its caption (a
    true render never does), so the verifier counts the noisy share per kind."""
    by_kind = {k: [p for p in all_prompts() if p["tag"] == k] for k in KINDS}
    by_text = {p["prompt"]: p for p in all_prompts()}
    rng = np.random.default_rng(2)
    failed, seen = collections.Counter(), collections.Counter()
    for _ in range(30):
        prompts, images = _batch(rng, by_kind, 64, 0.0, 0.7, NOISY_KINDS)
        for text, img in zip(prompts, images.numpy()):
            meta = by_text[text]
            seen[meta["tag"]] += 1
            failed[meta["tag"]] += not verify(from_unit(img), meta)[0].strict
    for kind in KINDS:
        share = failed[kind] / seen[kind]
        if kind in NOISY_KINDS:
            assert abs(share - 0.7) < 4 * (0.21 / seen[kind]) ** 0.5, (kind, share, seen[kind])
        else:
            assert share == 0.0, (kind, share)
    assert set(NOISY_KINDS) == {"two_object", "counting", "position"}  # colours stay clean (see prompts.py)


def test_noise_settings_are_checked(tmp_path):
    assert ToyPretrainConfig().noisy_kinds == list(NOISY_KINDS)  # the config's default is the world's list
    with pytest.raises(GdroError, match="noisy_kinds: single_object"):
        main(_tiny(tmp_path / "m", noisy_kinds=["single_object"]))
    assert not (tmp_path / "m").exists()  # refused before anything is written
    with pytest.raises(GdroError, match="relation_noise"):
        ToyPretrainConfig(relation_noise="sideways").check("")
    with pytest.raises(GdroError, match="count_noise"):
        ToyPretrainConfig(count_noise="sideways").check("")
    with pytest.raises(GdroError, match="color_noise"):
        ToyPretrainConfig(color_noise="any").check("")
    assert ToyPretrainConfig.NOISE_CHOICES == CaptionNoise.CHOICES  # the config checks what the world accepts
    with pytest.raises(ValueError, match="count noise"):
        CaptionNoise(count="sideways")


def test_a_noisy_colour_is_the_palettes_next_one_with_color_next():
    """"other": all five other colours appear, so the caption's colour stays the likeliest below rate 5/6;
    "next": always the palette's next colour (white wraps to red), one-sided above rate 1/2; the scene drawn
    has that colour and fails its caption."""
    rng = np.random.default_rng(4)
    for color, nxt in (("red", "green"), ("purple", "white"), ("white", "red")):
        meta = next(p for p in all_prompts() if p["tag"] == "colors" and p["include"][0]["color"] == color)
        others = collections.Counter(perturb(meta, rng)["include"][0]["color"] for _ in range(200))
        assert set(others) == set(COLORS) - {color} and min(others.values()) > 20
        assert {perturb(meta, rng, CaptionNoise(color="next"))["include"][0]["color"] for _ in range(20)} == {nxt}
        scene = noisy_scene(meta, rng, CaptionNoise(color="next"))
        assert [o.color for o in scene] == [nxt] and not verify(render(scene), meta)[0].strict


def test_init_starts_from_a_model_folders_weights(tmp_path):
    """Continued pre-training: with a vanishing learning rate the run ends where its init folder was (and not
    where a run from random weights would); a folder of another architecture is refused naming init."""
    first = main(_tiny(tmp_path / "a", steps=3, eval_every=100))
    cont = main(_tiny(tmp_path / "b", steps=2, eval_every=100, lr=1e-12, seed=5, init=str(first)))
    fresh = main(_tiny(tmp_path / "c", steps=2, eval_every=100, lr=1e-12, seed=5))
    sub = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(str(x / sub)) for x in (first, cont, fresh))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-3) for k in a)
    with pytest.raises(GdroError, match="init: .* does not fit"):
        main(_tiny(tmp_path / "d", steps=2, eval_every=100, unet_channels=[16, 16, 32], init=str(first)))


def test_cross_attention_levels_choose_where_the_unet_reads_the_prompt(tmp_path):
    """1 (the shipped base): cross-attention at 8x8 only; 2: also at 16x16, attending to the prompt only (no
    self-attention over 256 pixels); the setting reaches the saved model, and a level outside [1, 3] is refused."""
    from pipeline.backends.toy import build_unet

    def attends(unet):  # per down block: None (convolutions only) or its attention's only_cross_attention
        return [None if not hasattr(b, "attentions") else b.attentions[0].transformer_blocks[0].only_cross_attention
                for b in unet.down_blocks]

    kw = {"text_dim": 32, "pooled_dim": 32, "channels": (8, 16, 32), "head_dim": 8}
    assert attends(build_unet(**kw)) == [None, None, False]
    assert attends(build_unet(**kw, cross_attention_levels=2)) == [None, True, False]
    assert attends(build_unet(**kw, cross_attention_levels=3)) == [True, True, False]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="cross_attention_levels"):
            build_unet(**kw, cross_attention_levels=bad)
    with pytest.raises(GdroError, match="unet_cross_attention must be at most .* = 3.*got 4"):
        ToyPretrainConfig(unet_cross_attention=4).check("")  # the recipe's key is named before start-up
    ToyPretrainConfig(unet_cross_attention=4, denoiser="sd3").check("")  # a setting of the unet only
    out = main(_tiny(tmp_path / "m", steps=2, eval_every=2, unet_cross_attention=2))
    assert attends(ToyBackend.from_pretrained(out).transformer) == [None, True, False]


def test_a_frozen_text_encoder_keeps_its_init_weights_while_the_denoiser_learns(tmp_path):
    """train_text_encoder=false: the saved text encoder is its init folder's, bit for bit; the denoiser moves.
    With the default (true) both move, so the check can fail."""
    first = main(_tiny(tmp_path / "a", steps=3, eval_every=100))
    frozen = main(_tiny(tmp_path / "b", steps=4, eval_every=100, init=str(first), train_text_encoder=False))
    trained = main(_tiny(tmp_path / "c", steps=4, eval_every=100, init=str(first)))
    text, unet = "text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.safetensors"

    def same(a, b, sub):
        x, y = load_file(str(a / sub)), load_file(str(b / sub))
        return all(torch.equal(x[k], y[k]) for k in x)

    assert same(first, frozen, text) and not same(first, frozen, unet)
    assert not same(first, trained, text)
