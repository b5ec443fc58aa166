"""The real backends against diffusers' own pipelines, on tiny random SD3 and FLUX folders, where a defect only
shows at a setting the end-to-end tests do not use: an adapter with alpha != rank, bf16 weights, FLUX's
sampling schedule, SD3.5-Medium's dual-attention blocks.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = ['a sign that says "hello"', "a cat sitting on a mat"]
MAX_LEN = 8  # T5 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.backends.tiny import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("fidelity")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux"), "root": root}


def experiment(backend: str, model, *overrides):
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, overrides=[f"model.backend={backend}", f"model.path={model}", *overrides])


def pipeline_images(folder, lora=None) -> np.ndarray:
    """Two images from diffusers' StableDiffusion3Pipeline loaded from `folder` (plus a LoRA), fixed noise."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe(PROMPTS, num_inference_steps=2, height=32, width=32, guidance_scale=4.5, max_sequence_length=MAX_LEN,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_exported_adapter_loads_at_the_strength_it_was_trained_at(tiny, tmp_path, one_rank):
    """r = 4, alpha = 8 (scale 2, as the presets' r 64, alpha 128): diffusers' `load_lora_weights` of export/lora
    on the base draws what the merged export folder draws."""
    from peft import LoraConfig

    from pipeline.backends.base import load_transformer
    from pipeline.runs import export
    from stages.train import LORA_TARGETS

    cfg = experiment("sd3", tiny["sd3"], "train.lora_rank=4", "train.lora_alpha=8")
    model = load_transformer("sd3", str(tiny["sd3"]))
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # a trained adapter: B != 0
    folder = export(SimpleNamespace(module=model), cfg, tmp_path / "export", lora=True, rank=0)
    base = pipeline_images(tiny["sd3"])
    loaded = pipeline_images(tiny["sd3"], lora=folder / "lora")
    merged = pipeline_images(folder)
    assert np.abs(loaded - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(loaded, merged, atol=1e-4)


def captured_timesteps(module) -> tuple[list[torch.Tensor], object]:
    """The `timestep` argument of every call of `module` (a forward pre-hook), and the hook's handle."""
    seen: list[torch.Tensor] = []

    def hook(_mod, _args, kwargs):
        seen.append(kwargs["timestep"].detach().double().clone())

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_sd3_transformer_sees_diffusers_timesteps_in_bf16(tiny):
    """A bf16 model: the timesteps gdro's sampler hands the transformer are StableDiffusion3Pipeline's (float32
    1000 t), not 1000 x a bf16-rounded t (up to 2.65 off on this 10-step, shift-3 schedule)."""
    from pipeline.backends.base import load_backend
    from pipeline.sampling import SamplerConfig, sample
    from schemas.seeds import noise_for

    backend = load_backend("sd3", str(tiny["sd3"]), dtype=torch.bfloat16, device="cpu", resolution=32,
                           max_sequence_length=MAX_LEN, guidance=4.5)
    noise = noise_for(0, backend.latent_shape)[None]
    ours, handle = captured_timesteps(backend.transformer)
    sample(backend, noise, backend.encode_prompts(PROMPTS[:1]), SamplerConfig(steps=10, shift=3.0, guidance=4.5),
           null_cond=backend.encode_prompts([""]))
    handle.remove()
    theirs, handle = captured_timesteps(backend.pipe.transformer)
    backend.pipe(PROMPTS[:1], num_inference_steps=10, height=32, width=32, guidance_scale=4.5,
                 max_sequence_length=MAX_LEN, latents=noise.to(torch.bfloat16), output_type="latent")
    handle.remove()
    assert len(ours) == len(theirs) == 10
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=0, atol=1e-3)


@pytest.mark.parametrize("shift", ["model", "exp_mu"])
def test_flux_sampler_follows_flux_pipeline(tiny, shift):
    """The timesteps FLUX's transformer receives and the final latents of gdro's sampler equal FluxPipeline's
    (sigmas linspace(1, 1/N, N) shifted by exp(mu), mu from the token count): with sampler.shift = 0 (the
    model's own shift) and with sampler.shift = exp(mu) computed here from FLUX.1's scheduler constants."""
    from pipeline.backends.base import load_backend
    from pipeline.backends.flux import pack_latents, unpack_latents
    from pipeline.sampling import SamplerConfig, sample
    from schemas.seeds import noise_for

    backend = load_backend("flux", str(tiny["flux"]), device="cpu", resolution=32, max_sequence_length=MAX_LEN,
                           guidance=3.5)
    tokens = 8 * 8  # 16 x 16 latents in 2 x 2 patches
    exp_mu = float(np.exp(0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)))
    sampler = SamplerConfig(steps=4, shift=0.0 if shift == "model" else exp_mu, guidance=3.5)
    noise = torch.stack([noise_for(s, backend.latent_shape) for s in (1, 2)])
    ours_t, handle = captured_timesteps(backend.transformer)
    ours = sample(backend, noise, backend.encode_prompts(PROMPTS), sampler)
    handle.remove()
    theirs_t, handle = captured_timesteps(backend.pipe.transformer)
    packed = backend.pipe(PROMPTS, num_inference_steps=4, height=32, width=32, guidance_scale=3.5,
                          max_sequence_length=MAX_LEN, latents=pack_latents(noise.clone()), output_type="latent").images
    handle.remove()
    torch.testing.assert_close(torch.stack(ours_t), torch.stack(theirs_t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, unpack_latents(packed, 16, 16), rtol=1e-4, atol=1e-5)


def test_shift_zero_is_for_flux_only(tiny):
    from pipeline.backends.base import load_backend
    from pipeline.errors import GdroError
    from pipeline.sampling import SamplerConfig, sample

    backend = load_backend("sd3", str(tiny["sd3"]), device="cpu", resolution=32, max_sequence_length=MAX_LEN)
    with pytest.raises(GdroError, match="sampler.shift=0"):
        sample(backend, torch.zeros(1, *backend.latent_shape), backend.encode_prompts(PROMPTS[:1]),
               SamplerConfig(steps=2, shift=0.0))


DGPO_TARGETS = re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                          r"to_add_out)")  # DGPO's eight LoRA targets (its scripts/train_sd3_dgpo.py), `attn` only


@pytest.mark.parametrize("preset", ["sd35_ocr", "sd35_geneval", "sd35_pickscore"])
def test_sd35_presets_adapt_dgpo_lora_targets(preset):
    """On an SD3.5-Medium-shaped transformer (dual-attention blocks: a second attention `attn2`), the presets'
    LoRA adapts exactly DGPO's modules: every projection of `attn`, none of `attn2`."""
    from diffusers import SD3Transformer2DModel

    from pipeline.config import ExperimentConfig, resolve
    from pipeline.adapters import lora_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                                  dual_attention_layers=(0,))
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(".attn2." in n for n in linear)  # the shape under test
    want = {n for n in linear if DGPO_TARGETS.fullmatch(n)}
    model.add_adapter(lora_config(resolve(ExperimentConfig, preset=preset, overrides=["train.lora_rank=4"]).train))
    got = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert got == want and len(want) == 2 * 8 - 1  # the last block (context_pre_only) has no to_add_out
