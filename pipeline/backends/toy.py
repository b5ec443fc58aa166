"""The toy backend: a small denoiser in pixel space plus a word-level text encoder.

Pixel space is the "latent" space here (decode is a clamp and a cast), so stage one stores images as latents.
The denoiser is either diffusers' `UNet2DConditionModel` (the shipped base: convolutions draw the world's
shapes crisply on a CPU budget) or a tiny `SD3Transformer2DModel` (the tests' tiny models, so the SD3 code
path, patch embedding, joint attention, AdaLN, stays exercised); the model folder's config names which. The text encoder is ours: a word vocabulary of the toy world, learned position
embeddings and two transformer layers (SD3's joint attention has no text positions, so order must be encoded
before it), trained jointly with the transformer by `stages/toy_pretrain.py` and frozen afterwards.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import GdroError
from ..toy.prompts import NUMBERS, RELATIONS
from ..toy.world import COLORS, PLURALS, SHAPES, SIZE, from_unit
from .base import BackendSpec, Conditioning, register_backend, timesteps, transformer_velocity

PAD, UNK = "<pad>", "<unk>"


def toy_vocabulary() -> list[str]:
    words = {"a", "photo", "of", "and"}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    return [PAD, UNK, *sorted(words)]


@dataclass
class TextEncoderConfig:
    vocab: list[str] = field(default_factory=toy_vocabulary)
    max_length: int = 12  # tokens; the longest toy prompt has 10 words
    dim: int = 128  # = the transformer's joint_attention_dim
    pooled_dim: int = 128
    layers: int = 2
    heads: int = 4


class ToyTextEncoder(nn.Module):
    """Words -> ([B, L, dim] token states, [B, pooled_dim] pooled vector)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.index = {w: i for i, w in enumerate(cfg.vocab)}
        self.embed = nn.Embedding(len(cfg.vocab), cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim))
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.pool = nn.Linear(cfg.dim, cfg.pooled_dim)
        nn.init.normal_(self.pos, std=0.02)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.cfg.max_length, dtype=torch.long)
        for b, text in enumerate(prompts):
            words = text.lower().replace(",", " ").split()
            if len(words) > self.cfg.max_length:
                raise GdroError(f"prompt {text!r} has {len(words)} words; the toy text encoder takes at most "
                                f"{self.cfg.max_length}")
            for j, w in enumerate(words):
                ids[b, j] = self.index.get(w, 1)
        return ids

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h))
        keep = (ids != 0).unsqueeze(-1).to(h.dtype)
        pooled = self.pool((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))
        return h, pooled

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> ToyTextEncoder:
        from safetensors.torch import load_file

        cfg = TextEncoderConfig(**json.loads((folder / "config.json").read_text()))
        enc = cls(cfg)
        enc.load_state_dict(load_file(str(folder / "model.safetensors")))
        return enc


def build_transformer(*, text_dim: int = 128, pooled_dim: int = 128, layers: int = 6, heads: int = 4,
                      head_dim: int = 48, patch_size: int = 4):
    """A tiny SD3Transformer2DModel on 32x32x3 pixels (4 px patches: 64 image tokens)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=SIZE, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=SIZE // patch_size,
    )


def build_unet(*, text_dim: int = 128, pooled_dim: int = 128, channels: tuple[int, ...] = (32, 64, 128),
               layers_per_block: int = 1, head_dim: int = 32, cross_attention_levels: int = 1):
    """A small UNet2DConditionModel on 32x32x3 pixels: convolutions at 32, 16 and 8 px, cross-attention to the
    prompt at the ``cross_attention_levels`` coarsest resolutions (1: only at 8x8, where a pixel sees the whole
    scene; 2: also at 16x16, where a prompt word can address a region; the finer levels attend to the prompt
    only, since self-attention over 256 pixels would double a step's cost), the pooled prompt vector added to
    the timestep embedding. Convolutions draw crisp shapes on CPU budgets where a 4-px-patch transformer draws blobs."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    if not 1 <= cross_attention_levels <= n:
        raise ValueError(f"cross_attention_levels must be in [1, {n}], got {cross_attention_levels}")
    k = cross_attention_levels
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k,
        up_block_types=("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k),
        only_cross_attention=(False,) * (n - k) + (True,) * (k - 1) + (False,),
        layers_per_block=layers_per_block, cross_attention_dim=text_dim, attention_head_dim=head_dim,
        norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim,
    )


class ToyBackend:
    """The model-backend interface (see `base.ModelBackend`) for the toy world."""

    name = "toy"
    latent_shape = (3, SIZE, SIZE)
    guidance_mode = "cfg"  # classifier-free guidance at sampling (pre-trained with 10 % empty captions)

    def __init__(self, transformer, text_encoder: ToyTextEncoder, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.transformer = transformer.to(device)
        if dtype != torch.float32:  # the toy weights are float32; cast only when asked
            self.transformer.to(dtype)
        self.text_encoder = text_encoder.to(device) if text_encoder is not None else None
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        load_text_encoder: bool = True) -> ToyBackend:
        import diffusers

        from .base import denoiser_class

        path = Path(path)
        for need in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors"):
            if not (path / need).is_file():
                raise GdroError(f"toy model folder {path} lacks {need}; point model.path at a folder written by "
                                f"`gdro toy pretrain` (the shipped one is models/toy-base)")
        denoiser = getattr(diffusers, denoiser_class("toy", str(path)))  # the UNet base or a tiny SD3 transformer
        transformer = denoiser.from_pretrained(path / "transformer", local_files_only=True)
        text = ToyTextEncoder.load(path / "text_encoder") if load_text_encoder else None
        return cls(transformer.eval(), text.eval() if text is not None else None, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        self.text_encoder.save(path / "text_encoder")
        (path / "model_index.json").write_text(json.dumps({"_class_name": "gdro.ToyBackend"}, indent=1))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids = self.text_encoder.tokenize(prompts).to(self.device)
        h, pooled = self.text_encoder(ids)
        return Conditioning(prompt_embeds=h, pooled_embeds=pooled)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v_theta(x_t, t, c) with t in [0, 1] (1 = noise)."""
        return transformer_velocity(self.transformer, x, t, cond)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return from_unit(latents.detach().float().cpu().numpy())


# ------------------------------------------------------------------------------------------ registration
def unet_velocity(module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, *,
                  guidance: float | None = None) -> torch.Tensor:
    """v(x_t, t, c) of a `UNet2DConditionModel` (the toy world's convolutional denoiser): token states go to its
    cross-attention, the pooled vector to its class-embedding projection (added to the timestep embedding, as
    SD3's pooled projection is). Timesteps in [0, 1000] as SD3's. No guidance input: CFG at sampling."""
    return module(x, timesteps(t, x) * 1000.0, encoder_hidden_states=cond.prompt_embeds,
                  class_labels=cond.pooled_embeds, return_dict=False)[0]


def toy_latent_shape(path: str, resolution: int) -> tuple[int, int, int]:
    if resolution not in (0, ToyBackend.latent_shape[-1]):
        raise GdroError(f"model.resolution={resolution}: the toy model draws {ToyBackend.latent_shape[-1]} px "
                        f"images only (use 0)")
    return ToyBackend.latent_shape


def load_toy(path: str, **kw) -> ToyBackend:
    toy_latent_shape(path, kw.pop("resolution", 0))
    for unused in ("max_sequence_length", "guidance"):  # the toy encoder has a fixed length; it guides by CFG
        kw.pop(unused, None)
    if kw.get("device") is None:
        kw.pop("device", None)
    return ToyBackend.from_pretrained(path, **kw)


def toy_verifier():
    """The toy world's verifier as `gdro eval` and selection use it (GenEval rules on the rendered scene)."""
    from ..toy.plugins import ToyVerifier

    return ToyVerifier()


# The toy world's shipped base is a UNet; tiny SD3-transformer toy models keep the SD3 code path under test (its
# velocity is the sd3 backend's).
register_backend(BackendSpec("toy", load_toy, ("UNet2DConditionModel", "SD3Transformer2DModel"), toy_latent_shape,
                             "cfg", "StableDiffusion3Pipeline", verifier=toy_verifier),
                 {"UNet2DConditionModel": unet_velocity})
