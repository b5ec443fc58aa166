"""`clip_score`, `aesthetic` (open_clip) and `pickscore` (transformers) on tiny random models built here, in the
local layouts real checkpoints come in; each score checked against the models' own forward passes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.errors import GdroError
from pipeline.rewards import make_reward, reward_identity

PROMPTS = ["a cat", 'a sign that says "hi"', "two green triangles", "a red circle above a blue square"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)  # not square, not the model's size
    imgs[1] = 255  # one flat image
    return imgs


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    pytest.importorskip("open_clip", reason="open_clip_torch is a gdro dependency (pip install -e .)")
    from pipeline.backends.tiny import build_tiny_open_clip

    return build_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from pipeline.backends.tiny import build_tiny_clip_model

    return build_tiny_clip_model(tmp_path_factory.mktemp("pickscore"))


def open_clip_forward(oc, images, prompts, quick_gelu: bool = False):
    """exp(logit_scale) x cos from open_clip's own forward (model(image, text) normalises both sides)."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(oc["name"], pretrained=str(oc["weights"]),
                                                                 force_quick_gelu=quick_gelu)
    model.eval()
    tok = open_clip.get_tokenizer(oc["name"])
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(i)) for i in images])
        img, txt, scale = model(x, tok(prompts))
    img, txt = img.double().numpy(), txt.double().numpy()
    return float(scale) * np.einsum("nd,nd->n", img, txt), img


def test_clip_score_equals_the_models_forward(tiny_open_clip, images):
    oc = tiny_open_clip
    r = make_reward("clip_score", {"model": oc["name"], "pretrained": str(oc["weights"]),
                                   "model_config": str(oc["model_config"]), "batch_size": 3})  # two batches
    scores, _ = r.fn(images, PROMPTS, None)
    want, img = open_clip_forward(oc, images, PROMPTS)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 0.1  # the scores do differ between pairs
    swapped, _ = r.fn(images, PROMPTS[::-1], None)  # another prompt, another score
    assert not np.allclose(swapped, scores)


def test_quick_gelu_is_applied(tiny_open_clip, images):
    oc = tiny_open_clip
    base = {"model": oc["name"], "pretrained": str(oc["weights"]), "model_config": str(oc["model_config"])}
    plain, _ = make_reward("clip_score", base).fn(images, PROMPTS, None)
    quick, _ = make_reward("clip_score", {**base, "quick_gelu": True}).fn(images, PROMPTS, None)
    np.testing.assert_allclose(quick, open_clip_forward(oc, images, PROMPTS, quick_gelu=True)[0], rtol=1e-4, atol=1e-5)
    assert np.abs(quick - plain).max() > 1e-4  # another activation, other scores
    folder, _ = make_reward("clip_score", {"pretrained": f"local-dir:{oc['local_dir']}", "quick_gelu": True}).fn(
        images, PROMPTS, None)
    np.testing.assert_allclose(folder, quick, rtol=1e-6)  # also for a local-dir: folder


def test_clip_score_from_a_local_open_clip_folder(tiny_open_clip, images):
    oc = tiny_open_clip
    a, _ = make_reward("clip_score", {"model": oc["name"], "pretrained": str(oc["weights"]),
                                      "model_config": str(oc["model_config"])}).fn(images, PROMPTS, None)
    b, _ = make_reward("clip_score", {"pretrained": f"local-dir:{oc['local_dir']}"}).fn(images, PROMPTS, None)
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_aesthetic_head_formats(tiny_open_clip, images, tmp_path, version):
    oc = tiny_open_clip
    rng = np.random.default_rng(1)
    dims = [16, 1] if version == "v1" else [16, 24, 12, 8, 4, 1]
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o)) for i, o in itertools.pairwise(dims)]
    if version == "v1":  # LAION-AI/aesthetic-predictor: nn.Linear(768, 1)
        state = {"weight": torch.tensor(weights[0][0], dtype=torch.float32),
                 "bias": torch.tensor(weights[0][1], dtype=torch.float32)}
    else:  # improved-aesthetic-predictor: Linear layers at 0, 2, 4, 6, 7 (dropout between, no activation)
        state = {}
        for idx, (w, b) in zip([0, 2, 4, 6, 7], weights):
            state[f"layers.{idx}.weight"] = torch.tensor(w, dtype=torch.float32)
            state[f"layers.{idx}.bias"] = torch.tensor(b, dtype=torch.float32)
    head = tmp_path / "head.pth"
    torch.save(state, head)
    scores, _ = make_reward("aesthetic", {"model": oc["name"], "pretrained": str(oc["weights"]), "head": str(head),
                                          "model_config": str(oc["model_config"])}).fn(images, PROMPTS, None)
    _, emb = open_clip_forward(oc, images, PROMPTS)  # L2-normalised image embeddings
    h = emb
    for w, b in weights:
        h = h @ w.T + b
    np.testing.assert_allclose(scores, h[:, 0], rtol=1e-4, atol=1e-5)
    other, _ = make_reward("aesthetic", {"model": oc["name"], "pretrained": str(oc["weights"]), "head": str(head),
                                         "model_config": str(oc["model_config"])}).fn(images, PROMPTS[::-1], None)
    np.testing.assert_array_equal(scores, other)  # the prompt is never looked at


def test_aesthetic_refuses_bad_heads(tiny_open_clip, tmp_path):
    oc = tiny_open_clip
    base = {"model": oc["name"], "pretrained": str(oc["weights"]), "model_config": str(oc["model_config"])}
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "odd.pth")
    with pytest.raises(GdroError, match=r"rollouts.rewards.aesthetic.head: .*odd.pth is no LAION aesthetic"):
        make_reward("aesthetic", {**base, "head": str(tmp_path / "odd.pth")})
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "l14.pth")
    with pytest.raises(GdroError, match=r"takes 768-d embeddings, but the open_clip model gives 16-d"):
        make_reward("aesthetic", {**base, "head": str(tmp_path / "l14.pth")})
    with pytest.raises(GdroError, match=r"rollouts.rewards.aesthetic.head is not set"):
        make_reward("aesthetic", base)


def test_weights_that_do_not_fit_are_named(tiny_open_clip, tmp_path):
    oc = tiny_open_clip
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GdroError, match=r"rollouts.rewards.clip_score: open_clip could not build .* with the "
                                        r"weights .*bad.pt .*check .model and .pretrained"):
        make_reward("clip_score", {"model": oc["name"], "pretrained": str(tmp_path / "bad.pt")})
    import json

    from pipeline.backends.tiny import TINY_OPEN_CLIP

    wider = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "width": 48}}
    (tmp_path / "gdro-tiny-wider.json").write_text(json.dumps(wider))
    with pytest.raises(GdroError, match=r"could not build 'gdro-tiny-wider' with the weights .*weights.pt"):
        make_reward("clip_score", {"model": "gdro-tiny-wider", "pretrained": str(oc["weights"]),  # another shape
                                   "model_config": str(tmp_path / "gdro-tiny-wider.json")})
    with pytest.raises(GdroError, match=r"could not build 'NoSuchArch'"):
        make_reward("clip_score", {"model": "NoSuchArch", "pretrained": str(oc["weights"])})


def test_open_clip_paths_are_checked_before_loading(tmp_path):
    with pytest.raises(GdroError, match=r"rollouts.rewards.clip_score.pretrained is not set"):
        make_reward("clip_score", {})
    with pytest.raises(GdroError, match=r"rollouts.rewards.clip_score.pretrained: .*nope.bin does not exist"):
        make_reward("clip_score", {"model": "ViT-L-14", "pretrained": str(tmp_path / "nope.bin")})
    with pytest.raises(GdroError, match=r"rollouts.rewards.aesthetic.pretrained: .* needs open_clip_config.json"):
        make_reward("aesthetic", {"pretrained": f"local-dir:{tmp_path}", "head": "x"})
    with pytest.raises(GdroError, match=r"write local-dir:"):
        make_reward("clip_score", {"model": "ViT-L-14", "pretrained": str(tmp_path)})
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(GdroError, match=r"rollouts.rewards.clip_score.model is not set"):
        make_reward("clip_score", {"pretrained": str(tmp_path / "w.bin")})


def test_pickscore_equals_the_models_forward(tiny_clip, images):
    from transformers import CLIPModel, CLIPProcessor

    r = make_reward("pickscore", {"path": str(tiny_clip), "batch_size": 3})
    scores, _ = r.fn(images, PROMPTS, None)
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True)
    want = []
    with torch.no_grad():
        for img, prompt in zip(images, PROMPTS):  # one pair at a time: no padding involved
            out = model(**proc(text=[prompt], images=[img], return_tensors="pt"))
            want.append(float(out.logits_per_image[0, 0]))  # exp(logit_scale) x cos, the model's own forward
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 0.1
    assert r.identity()["params"]["transformers_version"]


def test_pickscore_processor_elsewhere_and_missing_paths(tiny_clip, images, tmp_path):
    import shutil

    weights = tmp_path / "model"  # the PickScore layout: model files only, the processor in another folder
    weights.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip / f, weights / f)
    with pytest.raises(GdroError, match=r"rollouts.rewards.pickscore.processor_path: .* is not a local "
                                        r"CLIPProcessor folder"):
        make_reward("pickscore", {"path": str(weights)})
    a, _ = make_reward("pickscore", {"path": str(weights), "processor_path": str(tiny_clip)}).fn(images, PROMPTS,
                                                                                                 None)
    b, _ = make_reward("pickscore", {"path": str(tiny_clip)}).fn(images, PROMPTS, None)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(GdroError, match=r"rollouts.rewards.pickscore.path is not set"):
        make_reward("pickscore", {})
    with pytest.raises(GdroError, match=r"rollouts.rewards.pickscore.path: .*absent does not exist"):
        make_reward("pickscore", {"path": str(tmp_path / "absent")})
    assert reward_identity("pickscore", {"path": "p"})["params"]["processor_path"] == "p"
