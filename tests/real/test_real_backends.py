"""The real backends end to end on tiny random-weight pipelines built offline: rollouts -> train -> export ->
diffusers load -> sample, through exactly the code a real SD3.5-Medium or FLUX.1 folder takes.

Each backend gets a session-built pipeline folder (`pipeline.backends.tiny`), one dataset made by the `gdro
rollouts` command (4 prompts x G = 4, 32 px, 2 steps, SD3 with CFG 4.5, FLUX with embedded guidance 3.5, K = 2
cached reference draws), scored by a user reward (`module:function`, the mean pixel value, so every group has
spread), and two training runs from the backend's preset with tiny overrides: LoRA with the live reference (the
adapter disabled) and the KL term, and full fine-tuning with the cached reference.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gdro_testing import MEAN_PIXEL_MODULE, check_cached_reference_errors, run_train, transformer_weights

pytestmark = pytest.mark.slow

REWARD = "gdro_real_reward:mean_pixel"
REWARD_MODULE = MEAN_PIXEL_MODULE
PROMPTS = ['a sign that says "hello"', "a cat sitting on a mat", 'a neon sign that says "open late"',
           "two green triangles"]
G = 4
MAX_LEN = 8  # T5 tokens
KINDS = {
    "sd3": {"preset": "sd35_ocr", "guidance": 4.5, "shift": 3.0, "pipeline": "StableDiffusion3Pipeline",
            "transformer": "SD3Transformer2DModel", "embeds": (77 + MAX_LEN, 32), "pooled": (32,)},
    "flux": {"preset": "flux_ocr", "guidance": 3.5, "shift": 1.88, "pipeline": "FluxPipeline",
             "transformer": "FluxTransformer2DModel", "embeds": (MAX_LEN, 32), "pooled": (16,)},
}


def make_cfg(kind: str, model: Path, root: Path, run: str = "unused", *overrides):
    """The backend's real preset, shrunk: tiny model, 4 prompts, G = 4, 2 sampler steps, 2 training steps."""
    from pipeline.config import ExperimentConfig, resolve

    k = KINDS[kind]
    return resolve(ExperimentConfig, preset=k["preset"], overrides=[
        f"model.path={model}", "model.dtype=float32", "model.resolution=32", f"model.max_sequence_length={MAX_LEN}",
        f"sampler.guidance={k['guidance']}", f"sampler.shift={k['shift']}", "sampler.steps=2",
        f"rollouts.prompts={root / 'prompts.txt'}", f"rollouts.out={root / 'dataset'}", "rollouts.num_prompts=0",
        "rollouts.prompts_per_shard=2", f"rollouts.group_size={G}", "rollouts.batch_size=8", "rollouts.ref_cache_k=2",
        f'rollouts.rewards={{"{REWARD}": {{}}}}', f"train.dataset={root / 'dataset'}", f"train.out={root / run}",
        f'train.reward_weights={{"{REWARD}": 1.0}}', "train.groups_per_step=2", "train.steps=2", "train.save_every=2",
        "train.num_workers=0", "train.lora_rank=4", "train.lora_alpha=8", "train.beta=50", *overrides])


def diffusers_images(kind: str, folder: Path, lora: Path | None = None) -> np.ndarray:
    """Two images from diffusers' own pipeline class loaded from `folder` (plus a LoRA), fixed noise."""
    import diffusers

    pipe = getattr(diffusers, KINDS[kind]["pipeline"]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = pipe(PROMPTS[:2], num_inference_steps=2, height=32, width=32, guidance_scale=KINDS[kind]["guidance"],
               max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


@pytest.fixture(scope="module", params=sorted(KINDS))
def world(request, tmp_path_factory):
    """A tiny pipeline folder, a dataset made by `gdro rollouts`, a LoRA run and a full run."""
    from pipeline.backends.tiny import build_tiny_flux, build_tiny_sd3
    from pipeline.cli import main as cli

    kind = request.param
    root = tmp_path_factory.mktemp(f"real_{kind}")
    model = (build_tiny_sd3 if kind == "sd3" else build_tiny_flux)(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "reward_mod").mkdir()
    (root / "reward_mod" / "gdro_real_reward.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "reward_mod"))
        cfg = make_cfg(kind, model, root)
        args = ["rollouts", "--preset", KINDS[kind]["preset"]]
        for key in ("model.path", "model.dtype", "model.resolution", "model.max_sequence_length", "sampler.guidance",
                    "sampler.shift", "sampler.steps", "rollouts.prompts", "rollouts.out", "rollouts.num_prompts",
                    "rollouts.prompts_per_shard", "rollouts.group_size", "rollouts.batch_size", "rollouts.ref_cache_k"):
            section, name = key.split(".")
            args += ["--set", f"{key}={getattr(getattr(cfg, section), name)}"]
        args += ["--set", f'rollouts.rewards={{"{REWARD}": {{}}}}']
        assert cli(args) == 0
        lora = run_train(make_cfg(kind, model, root, "run_lora", "train.lr=2e-2"))  # the preset's live LoRA ref + KL
        full = run_train(make_cfg(kind, model, root, "run_full", "train.lora_rank=0", "train.reference=cache",
                                  "train.kl_beta=0", "train.lr=1e-3"))
    return {"kind": kind, "root": root, "model": model, "dataset": root / "dataset", "lora": lora, "full": full}


def test_rollouts_write_vae_latents_and_embeddings(world):
    from schemas import layout
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, verify_dataset

    kind, k = world["kind"], KINDS[world["kind"]]
    assert verify_dataset(world["dataset"]) == []
    m = json.loads((world["dataset"] / "manifest.json").read_text())
    gen = m["generator"]
    assert gen["backend"] == kind and gen["latent_shape"] == [4, 16, 16]  # 32 px through a 2x VAE
    assert gen["guidance_mode"] == ("cfg" if kind == "sd3" else "embedded")
    assert m["sampler"]["guidance"] == k["guidance"] and m["reference_cache"]["K"] == 2
    assert (m["latents_dtype"], m["embeds_dtype"]) == ("bfloat16", "bfloat16")  # the GPU presets' storage
    assert "transformer/diffusion_pytorch_model.safetensors" in gen["weights_sha256"]
    groups = 0
    for sh in m["shards"]:
        for key, raw in iter_tar_groups(world["dataset"] / sh["tar"]):
            rec, arrays = decode_group(key, raw, sh["tar"], array_dtypes(m))
            assert arrays[layout.LATENTS_MEMBER].shape == (G, 4, 16, 16)
            assert arrays[layout.PROMPT_EMBEDS_MEMBER].shape == k["embeds"]
            assert arrays[layout.POOLED_EMBEDS_MEMBER].shape == k["pooled"]
            assert np.isfinite(arrays[layout.LATENTS_MEMBER]).all()
            r = rec.rewards[REWARD]
            assert all(s == "ok" for s in rec.status) and max(r) > min(r)
            groups += 1
    assert groups == len(PROMPTS)


def test_stage_two_velocity_reproduces_the_cached_reference_errors(world):
    """Stage two's path (only the transformer, the backend's velocity function, the stored latents and
    embeddings, the manifest's guidance) recomputes stage one's cached reference errors: one code path."""
    from pipeline.backends.base import dataset_velocity, load_transformer

    kind = world["kind"]
    tr = load_transformer(kind, str(world["model"])).eval()
    assert type(tr).__name__ == KINDS[kind]["transformer"]
    velocity = dataset_velocity(kind, json.loads((world["dataset"] / "manifest.json").read_text()))
    checked = check_cached_reference_errors(world["dataset"], lambda x, t, c: velocity(tr, x, t, c), G)
    assert checked == len(PROMPTS) * 2


def test_training_ran_and_wrote_metrics(world):
    for run in (world["lora"], world["full"]):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in recs)
    lora_recs = [json.loads(x) for x in (world["lora"] / "metrics.jsonl").read_text().splitlines()]
    assert lora_recs[0]["rho_mean"] == 0.0 and lora_recs[1]["kl"] > 0.0  # adapter B = 0 at init: policy == ref


def test_exported_lora_loads_in_diffusers_and_changes_the_output(world):
    kind, export = world["kind"], world["lora"] / "export"
    lora = export / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    base = diffusers_images(kind, world["model"])
    with_lora = diffusers_images(kind, world["model"], lora=lora)
    assert base.shape == with_lora.shape == (2, 32, 32, 3)
    assert np.abs(with_lora - base).max() > 1e-3  # the adapter changes what diffusers draws
    merged = diffusers_images(kind, export)  # the export folder is a whole pipeline, LoRA merged in
    np.testing.assert_allclose(merged, with_lora, atol=1e-4)


def test_exported_full_model_differs_from_the_base_and_samples(world):
    import diffusers

    from pipeline.backends.base import load_backend
    from pipeline.sampling import SamplerConfig, sample
    from schemas.seeds import noise_for

    kind, export = world["kind"], world["full"] / "export"
    trained, base = transformer_weights(export), transformer_weights(world["model"])
    assert trained.keys() == base.keys() and any(not torch.equal(trained[n], base[n]) for n in base)
    tr = getattr(diffusers, KINDS[kind]["transformer"]).from_pretrained(export / "transformer",
                                                                        local_files_only=True)
    assert all(torch.isfinite(p).all() for p in tr.parameters())
    images = diffusers_images(kind, export)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # and through gdro's own backend, as `gdro eval` samples
    k = KINDS[kind]
    backend = load_backend(kind, str(export), resolution=32, max_sequence_length=MAX_LEN, guidance=k["guidance"])
    sampler = SamplerConfig(steps=2, shift=k["shift"], guidance=k["guidance"])
    null = backend.encode_prompts([""]) if kind == "sd3" else None
    lat = sample(backend, noise_for(0, backend.latent_shape)[None], backend.encode_prompts(PROMPTS[:1]), sampler,
                 null_cond=null)
    img = backend.decode(lat)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8


def test_gdro_sampling_equals_the_diffusers_pipeline(world):
    """Same noise, steps, shift and guidance: gdro's sampler on the backend gives the latents diffusers' own
    StableDiffusion3Pipeline gives (FLUX: the velocity equals the pipeline's packed transformer call)."""
    from pipeline.backends.base import load_backend, transformer_velocity
    from pipeline.sampling import SamplerConfig, sample
    from schemas.seeds import noise_for

    kind, k = world["kind"], KINDS[world["kind"]]
    backend = load_backend(kind, str(world["model"]), resolution=32, max_sequence_length=MAX_LEN,
                           guidance=k["guidance"])
    pipe = backend.pipe
    noise = torch.stack([noise_for(s, backend.latent_shape) for s in (1, 2)])
    cond = backend.encode_prompts(PROMPTS[:2])
    if kind == "sd3":
        ours = sample(backend, noise, cond, SamplerConfig(steps=3, shift=3.0, guidance=k["guidance"]),
                      null_cond=backend.encode_prompts([""]))
        theirs = pipe(PROMPTS[:2], num_inference_steps=3, height=32, width=32, guidance_scale=k["guidance"],
                      max_sequence_length=MAX_LEN, latents=noise.clone(), output_type="latent").images
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        return
    t = torch.tensor([0.7, 0.3])
    ours = backend.velocity(noise, t, cond)
    packed = pipe._pack_latents(noise, 2, 4, 16, 16)
    ids = pipe._prepare_latent_image_ids(2, 8, 8, noise.device, noise.dtype)
    out = pipe.transformer(hidden_states=packed, timestep=t, guidance=torch.full((2,), k["guidance"]),
                           pooled_projections=cond.pooled_embeds, encoder_hidden_states=cond.prompt_embeds,
                           txt_ids=torch.zeros(MAX_LEN, 3), img_ids=ids, return_dict=False)[0]
    torch.testing.assert_close(ours, pipe._unpack_latents(out, 32, 32, 2), rtol=1e-5, atol=1e-6)
    # the class-dispatched entry point takes the same path
    torch.testing.assert_close(transformer_velocity(pipe.transformer, noise, t, cond, guidance=k["guidance"]), ours)
