"""Compact storage chosen per dataset: latents and embeddings in float32, float16 or bfloat16 (bf16 as the uint16
of its bit patterns, dtype in the manifest, never pickle); images PNG, lossless WebP, or a lossy WebP/JPEG preview
with its quality recorded and the dataset marked as not re-scorable."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import make_cfg, run


def _groups(root):
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest

    m = load_manifest(root)
    return m, {key: (decode_group(key, raw, sh["tar"], array_dtypes(m)), raw)
               for sh in m["shards"] for key, raw in iter_tar_groups(root / sh["tar"])}


def test_bfloat16_and_float16_storage_round_like_torch():
    from schemas.codec import from_storage, to_storage

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-6, 6, 4096)
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, 1e-40])])
    bits = to_storage(x.numpy(), "bfloat16")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits.view(np.int16), x.to(torch.bfloat16).view(torch.int16).numpy())
    back = from_storage(bits, "bfloat16", "here")
    np.testing.assert_array_equal(back, x.to(torch.bfloat16).float().numpy())
    assert np.isnan(from_storage(to_storage(np.array([np.nan], np.float32), "bfloat16"), "bfloat16", "h")).all()
    in_range = x[x.abs() < 6e4]
    half = from_storage(to_storage(in_range.numpy(), "float16"), "float16", "here")
    np.testing.assert_array_equal(half, in_range.half().float().numpy())
    with pytest.raises(ValueError, match="exceeds float16's range"):  # never a silent inf
        to_storage(np.array([1.0, 7e4], np.float32), "float16")
    exact = x.to(torch.bfloat16).float().numpy()  # what a bf16 model gives: stored without loss
    np.testing.assert_array_equal(from_storage(to_storage(exact, "bfloat16"), "bfloat16", "h"), exact)


def test_a_stored_dtype_other_than_the_manifests_is_refused():
    from schemas.codec import ShardError, from_storage

    with pytest.raises(ShardError, match="holds float32 but the manifest says bfloat16"):
        from_storage(np.zeros(3, np.float32), "bfloat16", "shard x, key y, member 'latents.npy'")


@pytest.fixture(scope="module")
def compact(tiny_toy_model, small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact") / "ds"
    return run(make_cfg(tiny_toy_model, out, "rollouts.latents_dtype=bfloat16", "rollouts.embeds_dtype=float16",
                        "rollouts.image_format=webp", "rollouts.image_quality=80"))


def test_16_bit_dataset_holds_the_32_bit_values_rounded(compact, small_dataset):
    from schemas.manifest import verify_dataset

    assert verify_dataset(compact) == []
    m, groups = _groups(compact)
    assert (m["latents_dtype"], m["embeds_dtype"], m["image_format"], m["image_quality"],
            m["images_rescorable"]) == ("bfloat16", "float16", "webp", 80, False)
    _, full = _groups(small_dataset)
    assert groups.keys() == full.keys()
    for key, ((rec, arrays), raw) in groups.items():
        (rec32, arrays32), _ = full[key]
        assert rec.rewards == rec32.rewards  # the images are scored before storage
        lat32 = torch.from_numpy(arrays32["latents.npy"])
        np.testing.assert_array_equal(arrays["latents.npy"], lat32.to(torch.bfloat16).float().numpy())
        for name in ("prompt_embeds.npy", "pooled_embeds.npy"):
            np.testing.assert_array_equal(arrays[name], torch.from_numpy(arrays32[name]).half().float().numpy())
        stored = np.load(io.BytesIO(raw["latents.npy"]), allow_pickle=False)
        assert stored.dtype == np.uint16 and stored.nbytes == arrays32["latents.npy"].nbytes // 2
        for i in range(rec.group_size):
            buf = io.BytesIO()  # Pillow's own lossy WebP of the lossless image, at the recorded quality
            Image.fromarray(arrays32[f"{i}.png"]).save(buf, format="WEBP", lossless=False, quality=80, method=4)
            assert raw[f"{i}.webp"] == buf.getvalue()


def test_the_cache_is_of_the_stored_16_bit_values(compact, tiny_toy_model, small_dataset):
    """Stage one computes the reference errors on the latents and embeddings as stored, so stage two's
    recomputation from the shards equals the cache (float32 values would differ by the rounding)."""
    from diffusers import SD3Transformer2DModel
    from gdro_testing import check_cached_reference_errors

    from pipeline.backends.base import dataset_velocity
    from schemas.manifest import load_manifest

    tr = SD3Transformer2DModel.from_pretrained(tiny_toy_model / "transformer").eval()
    velocity = dataset_velocity("toy", load_manifest(compact))
    assert check_cached_reference_errors(compact, lambda x, t, c: velocity(tr, x, t, c), 3) == 6 * 2
    _, ours = _groups(compact)
    _, full = _groups(small_dataset)
    assert any(ours[k][0][0].ref_errors != full[k][0][0].ref_errors for k in ours)  # rounding did change them


def test_the_trainer_reads_16_bit_storage_as_float32(compact):
    from pipeline.train_data import group_batches

    _, groups = _groups(compact)
    _, batches = group_batches(compact, groups=2, weights={"toy_geneval": 1.0}, seed=0, rank=0, world=1,
                               workers=0, shuffle_buffer=1, order="sequential")
    batch = next(iter(batches))
    assert batch["latents"].dtype == torch.float32 and batch["prompt_embeds"].dtype == torch.float32
    for j, key in enumerate(batch["keys"]):
        (_, arrays), _ = groups[key]
        np.testing.assert_array_equal(batch["latents"][j].numpy(), arrays["latents.npy"])
        np.testing.assert_array_equal(batch["prompt_embeds"][j].numpy(), arrays["prompt_embeds.npy"])


def test_jpeg_previews_and_the_card_say_so(tiny_toy_model, tmp_path):
    root = run(make_cfg(tiny_toy_model, tmp_path / "ds", "rollouts.num_prompts=2", "rollouts.image_format=jpeg",
                        "rollouts.image_quality=90"))
    m = json.loads((root / "manifest.json").read_text())
    assert "0.jpg" in m["member_names"] and m["images_rescorable"] is False
    assert "quality 90 (lossy" in (root / "README.md").read_text()
    from schemas.manifest import verify_dataset

    assert verify_dataset(root) == []


@pytest.mark.parametrize("overrides,match", [
    (["rollouts.image_format=jpeg"], "jpeg is lossy: set image_quality"),
    (["rollouts.image_quality=80"], "png is lossless"),
    (["rollouts.latents_dtype=float8"], "latents_dtype"),
])
def test_impossible_storage_settings_are_refused(tiny_toy_model, tmp_path, overrides, match):
    from pipeline.errors import GdroError

    with pytest.raises(GdroError, match=match):
        make_cfg(tiny_toy_model, tmp_path / "ds", *overrides)


def test_gpu_presets_store_16_bit():
    from pipeline.config import ExperimentConfig, resolve

    for preset in ("sd35_ocr", "sd35_geneval", "sd35_pickscore", "flux_ocr"):
        r = resolve(ExperimentConfig, preset=preset).rollouts
        assert (r.latents_dtype, r.embeds_dtype) == ("bfloat16", "bfloat16"), preset
    assert resolve(ExperimentConfig, preset="toy").rollouts.latents_dtype == "float32"


def test_float16_overflow_in_rollouts_is_one_line_naming_the_key():
    """Stage one rounds latents to their storage before anything is written: a value float16 cannot hold stops
    with a GdroError (one CLI line) that names the key to change, not a ValueError traceback."""
    import torch

    from pipeline.errors import GdroError
    from stages.rollouts import _as_stored

    with pytest.raises(GdroError, match=r"rollouts\.latents_dtype=float16: .*exceeds float16's range"):
        _as_stored(torch.tensor([1.0, 7e4]), "float16", "rollouts.latents_dtype")
    assert _as_stored(torch.tensor([1.0, 2.0]), "float16", "rollouts.latents_dtype").tolist() == [1.0, 2.0]
