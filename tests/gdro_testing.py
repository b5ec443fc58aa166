"""Helpers shared by test modules (importable as `gdro_testing`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch


def run_train(cfg, **kwargs) -> Path:
    """stages.train.main in-process, leaving the test process as it found it (signal handlers, environment)."""
    from stages.train import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        return main(cfg, **kwargs)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer weights of a model folder (an export, or a base model)."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


def check_cached_reference_errors(dataset: Path, velocity, group_size: int) -> int:
    """Recompute every cached reference error of a dataset (stored latents and embeddings, the recorded t and
    noise seed) with `velocity(x, t, cond)` and compare (rtol 1e-5); returns how many (group, draw) were checked."""

    import numpy as np

    from pipeline.backends.base import Conditioning
    from pipeline.flow import flow_errors
    from schemas import layout
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest
    from schemas.seeds import noise_for

    m = load_manifest(Path(dataset))
    shape = tuple(m["generator"]["latent_shape"])
    checked = 0
    with torch.no_grad():
        for sh in m["shards"]:
            for key, raw in iter_tar_groups(Path(dataset) / sh["tar"]):
                rec, arrays = decode_group(key, raw, sh["tar"], array_dtypes(m))
                x0 = torch.from_numpy(arrays[layout.LATENTS_MEMBER])
                cond = Conditioning(torch.from_numpy(arrays[layout.PROMPT_EMBEDS_MEMBER])[None],
                                    torch.from_numpy(arrays[layout.POOLED_EMBEDS_MEMBER])[None])
                cond = cond.repeat_interleave(group_size)
                assert len(rec.ref_t) == len(rec.ref_noise_seeds) == len(rec.ref_errors)
                for k, (t_k, seed_k) in enumerate(zip(rec.ref_t, rec.ref_noise_seeds)):
                    eps = noise_for(int(seed_k), shape).expand(group_size, *shape)
                    err = flow_errors(velocity, x0, eps, torch.tensor([t_k]), cond)
                    np.testing.assert_allclose(err.double().numpy(), np.asarray(rec.ref_errors[k]), rtol=1e-5)
                    checked += 1
    return checked


# A user scorer ("module:function") for the subprocess tests: the mean pixel value of each image in [0, 1]. Each
# test writes it under a module name of its own (REWARD = "<name>:mean_pixel") into a folder on PYTHONPATH.
MEAN_PIXEL_MODULE = """
import numpy as np


def mean_pixel():
    def fn(images, prompts, metadata):
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0, {}

    return fn
"""


def tar_groups(tar_path) -> dict[str, dict[str, bytes]]:
    """A shard's raw members, {key: {member suffix: bytes}}, read with tarfile (independent of gdro's readers)."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for info in tf:
            key, _, member = info.name.partition(".")
            out.setdefault(key, {})[member] = tf.extractfile(info).read()
    return out
