"""The writer's side of a dataset folder: identity and fingerprint, refusal to mix configs, atomic files,
and deciding which shards are finished (stats present and checksums matching) or leftovers to remove."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

from schemas import SCHEMA_VERSION, layout
from schemas.codec import json_bytes
from schemas.records import ShardStats, sha256_bytes, sha256_file
from schemas.seeds import SEED_SCHEME

from .config import ExperimentConfig, to_dict
from .errors import GdroError
from .rewards import reward_identity

LIBRARIES = ("torch", "diffusers", "transformers", "webdataset", "pyarrow", "numpy", "Pillow", "deepspeed")


def weights_sha256(model_path: str) -> dict[str, str]:
    root = Path(model_path)
    if not root.is_dir():
        raise GdroError(f"model.path: {model_path} is not a folder; point it at a local model folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return {str(p.relative_to(root)): sha256_file(p) for p in files if not p.name.startswith(".")}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def code_version() -> str:
    from importlib.metadata import version

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"gdro {version('gdro')}" + (f" ({rev})" if rev else "")


def identity(cfg: ExperimentConfig, prompts: list[dict]) -> dict:
    """Everything that determines the bytes of the shards; its hash is the dataset's fingerprint."""
    r, m = cfg.rollouts, cfg.model
    from .backends.base import latent_shape_of, spec_of

    return {
        "schema_version": SCHEMA_VERSION,
        "generator": {"backend": m.backend, "model_path": m.path, "weights_sha256": weights_sha256(m.path),
                      "dtype": m.dtype, "latent_shape": list(latent_shape_of(m.backend, m.path, m.resolution)),
                      "resolution": m.resolution, "max_sequence_length": m.max_sequence_length,  # 0: defaults
                      "guidance_mode": spec_of(m.backend).guidance_mode},  # cfg: sampler.guidance is CFG's scale
        "sampler": to_dict(cfg.sampler),
        "prompts": {"source": r.prompts, "count": len(prompts),
                    "sha256": sha256_bytes(b"".join(json_bytes(p) + b"\n" for p in prompts))},
        "group_size": r.group_size,
        "prompts_per_shard": r.prompts_per_shard,
        "num_shards": layout.num_shards(len(prompts), r.prompts_per_shard),
        "batch_size": r.batch_size,
        "seed_scheme": {"base_seed": r.base_seed, "scheme": SEED_SCHEME},
        "rewards": [reward_identity(name, params) for name, params in r.rewards.items()],
        "reference_cache": {"K": r.ref_cache_k, "t_law": r.t_law, "t_min": r.t_min, "t_max": r.t_max,
                            "t_seed": "member_seed(base_seed, prompt_id, 0, 'ref_t{k}')",
                            "noise_seed": "member_seed(base_seed, prompt_id, 0, 'ref_eps{k}'), shared by the group",
                            "error": "mean over C,H,W of (v_ref(x_t, t, c) - (eps - x0))^2, float32"},
        "image_format": r.image_format,
        "image_quality": r.image_quality,  # 0: lossless
        "images_rescorable": r.image_quality == 0,  # lossless images score as the rewards saw them
        "latents_dtype": r.latents_dtype,
        "embeds_dtype": r.embeds_dtype,
        **({"generator_lineage": r.lineage} if r.lineage else {}),  # `gdro rounds`; absent otherwise (fingerprints
        # unchanged); not "lineage", which records a rescore's parents
    }


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


def prepare_folder(root: Path, cfg: ExperimentConfig, prompts: list[dict]) -> str:
    """Record the identity on first use; refuse a different one later, naming the keys that differ."""
    return record_identity(root, identity(cfg, prompts), to_dict(cfg),
                           "restore the old configuration to resume")


def record_identity(root: Path, ident: dict, resolved: dict, how_to_resume: str) -> str:
    """Write <root>/rollouts_config.json with this identity and its fingerprint on first use (rollouts, or a
    rescore); refuse a folder started with another identity, naming the keys that differ."""
    fingerprint = sha256_bytes(json_bytes(ident))[:16]
    path = root / layout.RUN_CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fingerprint:
            keys = _diff(old.get("identity", {}), ident) or ["(unknown: the stored identity is unreadable)"]
            raise GdroError(f"{root} holds a dataset generated with another configuration; differing keys: "
                            f"{', '.join(keys)}. Use a new output folder, or {how_to_resume}")
        return fingerprint
    record = {"fingerprint": fingerprint, "identity": ident, "resolved_config": resolved,
              "code_version": code_version(), "library_versions": library_versions()}
    layout.atomic_write(path, (json.dumps(record, indent=1) + "\n").encode(), shared=True)
    return fingerprint


def shard_is_complete(root: Path, index: int, fingerprint: str) -> bool:
    """True if the shard's stats exist and its files match them; otherwise remove every trace of it."""
    paths = layout.shard_paths(root, index)
    if paths["stats"].exists():
        try:
            stats = ShardStats.load(paths["stats"])
            ok = (stats.fingerprint == fingerprint and paths["tar"].exists() and paths["parquet"].exists()
                  and sha256_file(paths["tar"]) == stats.tar_sha256
                  and sha256_file(paths["parquet"]) == stats.parquet_sha256)
        except Exception:  # noqa: BLE001  any unreadable stats file means the shard is redone
            ok = False
        if ok:
            return True
    order = (paths["stats"], paths["tar"], paths["parquet"])  # the completion marker goes first
    for p in (*order, *(layout.tmp_path(p) for p in order)):
        p.unlink(missing_ok=True)
    return False
