"""The seed scheme: a seed is a hash of (base_seed, prompt_id, member), so output never depends on how work is
split across tasks or devices. Initial noise is drawn on the CPU in float32 with that seed, then cast."""
from __future__ import annotations

import hashlib

import torch

SEED_SCHEME = "sha256('{base_seed}:{prompt_id}:{member}:{purpose}')[:8] as uint64 & (2**63 - 1); torch CPU randn float32"


def member_seed(base_seed: int, prompt_id: int, member: int, purpose: str = "sample") -> int:
    """Seed for one image (purpose 'sample') or one cached reference draw (purpose 'ref<k>')."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{member}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noise_for(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The one noise tensor a seed stands for: CPU generator, float32 (cast afterwards by the caller)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)
