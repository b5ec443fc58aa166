"""CLIP-family rewards from local weights: `clip_score` and `aesthetic` (open_clip), `pickscore` (transformers).

- `clip_score`: exp(logit_scale) x cos(image embedding, prompt embedding) of an open_clip model (100 x cos for
  OpenAI's CLIP; Flow-GRPO divides its CLIP score by 30, which the group advantages do not see).
  `model`: an open_clip architecture name (`ViT-L-14`, ...); `pretrained`: a local weights file, or
  `local-dir:<folder>` (a folder holding `open_clip_config.json` and `open_clip_pytorch_model.bin` or
  `open_clip_model.safetensors`, the layout of open_clip models on the hub; with it the architecture is read
  from the folder and `model` is ignored). `model_config`: an optional JSON file of your own architecture
  (open_clip's `model_configs/*.json` format; its file name without `.json` is then the `model` name).
  `quick_gelu: true` forces QuickGELU activations, which OpenAI's CLIP weights were trained with (open_clip's
  `-quickgelu` architectures, or its `openai` tag, set it; a `local-dir:` folder's config may not say so).
- `aesthetic`: a head on the L2-normalised open_clip image embedding (the prompt is not looked at). `head` is a
  local file (`.pth`/`.pt` read with `torch.load(weights_only=True)`, or `.safetensors`) in the LAION aesthetic
  predictor formats: v1 (LAION-AI/aesthetic-predictor, `sa_0_4_vit_l_14_linear.pth`: one linear layer, keys
  `weight` [1, D] and `bias` [1]) or v2 (christophschuhmann/improved-aesthetic-predictor,
  `sac+logos+ava1-l14-linearMSE.pth`: `layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7` linear layers,
  768 -> 1024 -> 128 -> 64 -> 16 -> 1, with only dropout between them, which is off at inference). Both expect
  ViT-L-14 (OpenAI) embeddings, D = 768: `model: ViT-L-14` with those weights in `pretrained`.
- `pickscore`: exp(logit_scale) x cos(image, prompt) of a transformers `CLIPModel` (PickScore_v1 is one) read
  from the local folder `path`, with the `CLIPProcessor` read from `processor_path` (default: `path`; PickScore's
  own repository has no processor: copy `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s processor files beside it or
  point `processor_path` at them). Flow-GRPO divides it by 26.

Every path is local; a missing one stops before any model loads, naming `rollouts.rewards.<name>.<param>`.
Images are uint8 [N, H, W, 3]; each model's own preprocessing (resize, crop, normalise) is applied to them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GdroError
from . import installed_version, register_reward

_LOCAL_DIR = "local-dir:"
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _need(reward: str, param: str, value: str, what: str) -> Path:
    key = f"rollouts.rewards.{reward}.{param}"
    if not value:
        raise GdroError(f"{key} is not set: point it at {what} (nothing is downloaded)")
    path = Path(value)
    if not path.exists():
        raise GdroError(f"{key}: {value} does not exist; point it at {what} (nothing is downloaded)")
    return path


def _check_open_clip(reward: str, model: str, pretrained: str, model_config: str) -> None:
    key = f"rollouts.rewards.{reward}"
    if pretrained.startswith(_LOCAL_DIR):
        folder = _need(reward, "pretrained", pretrained[len(_LOCAL_DIR):],
                       "a local open_clip folder (open_clip_config.json + weights)")
        if not (folder / "open_clip_config.json").is_file() or not any(
                (folder / f).is_file() for f in _OPEN_CLIP_WEIGHTS):
            raise GdroError(f"{key}.pretrained: {folder} needs open_clip_config.json and one of "
                            f"{', '.join(_OPEN_CLIP_WEIGHTS)}")
    else:
        path = _need(reward, "pretrained", pretrained, "a local open_clip weights file, or local-dir:<folder>")
        if not path.is_file():
            raise GdroError(f"{key}.pretrained: {pretrained} is a folder; write local-dir:{pretrained} for an "
                            f"open_clip model folder, or name the weights file")
        if not model:
            raise GdroError(f"{key}.model is not set: name the open_clip architecture of {pretrained} (e.g. "
                            f"ViT-L-14)")
    if model_config:
        _need(reward, "model_config", model_config, "an open_clip model config JSON file")


def _load_open_clip(reward: str, model: str, pretrained: str, model_config: str, device: str,
                    quick_gelu: bool = False):
    """(model, preprocess, tokenizer) of open_clip from local files only."""
    import open_clip
    import torch

    if model_config:
        open_clip.add_model_config(model_config)
    if pretrained.startswith(_LOCAL_DIR):
        name, weights = pretrained, None  # open_clip reads the architecture and weights from the folder
    else:
        name, weights = model, pretrained
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device,
                                                                    force_quick_gelu=bool(quick_gelu))
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001  an unknown architecture, weights that do not fit it, a file that is no checkpoint
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise GdroError(f"rollouts.rewards.{reward}: open_clip could not build {name!r} with the weights "
                        f"{pretrained} ({type(e).__name__}: {first}); check .model and .pretrained") from None
    clip.eval()
    return clip, preprocess, tokenizer, torch


def _open_clip_describe(reward: str):
    def describe(model: str = "", pretrained: str = "", model_config: str = "", **params) -> dict:
        return {"model": model, "pretrained": pretrained, **({"model_config": model_config} if model_config else {}),
                **params, "open_clip_version": installed_version("open_clip_torch")}

    return describe


def _pick_device(device: str) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _image_embeds(clip, preprocess, images: np.ndarray, device: str, torch):
    from PIL import Image

    x = torch.stack([preprocess(Image.fromarray(np.asarray(img, np.uint8))) for img in images]).to(device)
    emb = clip.encode_image(x).float()
    return emb / emb.norm(dim=-1, keepdim=True)


@register_reward("clip_score", version="1", describe=_open_clip_describe("clip_score"))
def clip_score(model: str = "", pretrained: str = "", model_config: str = "", quick_gelu: bool = False,
               batch_size: int = 32, device: str = ""):
    """exp(logit_scale) x cos(image, prompt) of a local open_clip model (module docstring)."""
    _check_open_clip("clip_score", model, pretrained, model_config)
    device = _pick_device(device)
    clip, preprocess, tokenizer, torch = _load_open_clip("clip_score", model, pretrained, model_config, device,
                                                         quick_gelu)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        out = []
        for s in range(0, len(images), batch_size):
            img = _image_embeds(clip, preprocess, images[s:s + batch_size], device, torch)
            txt = clip.encode_text(tokenizer(list(prompts[s:s + batch_size])).to(device)).float()
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((clip.logit_scale.exp().float() * (img * txt).sum(-1)).cpu().numpy())
        return np.concatenate(out).astype(np.float64), {}

    return fn


def load_aesthetic_head(path: str, dim: int, key: str = "rollouts.rewards.aesthetic.head"):
    """A LAION aesthetic predictor head (v1: one linear layer; v2: the `layers.*` MLP) as a torch module."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  torch.load raises many types; all mean "not a state dict"
            raise GdroError(f"{key}: cannot read {path} as a torch state dict ({str(e).splitlines()[0][:200]})") \
                from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GdroError(f"{key}: {path} is not a state dict of tensors")
    if set(state) == {"weight", "bias"}:  # v1: nn.Linear(D, 1)
        names = [""]
    else:
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        names = [f"layers.{i}." for i in idx]
        if not idx or set(state) != {f"{n}{p}" for n in names for p in ("weight", "bias")}:
            raise GdroError(f"{key}: {path} is no LAION aesthetic predictor: expected the keys weight and bias (v1, "
                            f"one linear layer) or layers.N.weight / layers.N.bias (v2 MLP); found "
                            f"{', '.join(sorted(state)[:8])}")
    layers = []
    for n in names:
        w, b = state[f"{n}weight"].float(), state[f"{n}bias"].float()
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise GdroError(f"{key}: {path}: {n}weight has shape {tuple(w.shape)}, bias {tuple(b.shape)}")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w, "bias": b})
        layers.append(lin)
    if layers[0].in_features != dim:
        raise GdroError(f"{key}: {path} takes {layers[0].in_features}-d embeddings, but the open_clip model gives "
                        f"{dim}-d ones (the LAION heads expect ViT-L-14, 768-d)")
    if layers[-1].out_features != 1:
        raise GdroError(f"{key}: {path} gives {layers[-1].out_features} outputs, not one score")
    return torch.nn.Sequential(*layers).eval()


@register_reward("aesthetic", version="1", describe=_open_clip_describe("aesthetic"))
def aesthetic(model: str = "", pretrained: str = "", head: str = "", model_config: str = "", quick_gelu: bool = False,
              batch_size: int = 32, device: str = ""):
    """A LAION aesthetic predictor head on the normalised open_clip image embedding (module docstring)."""
    _check_open_clip("aesthetic", model, pretrained, model_config)
    head_path = _need("aesthetic", "head", head, "a LAION aesthetic predictor file (.pth or .safetensors)")
    if not head_path.is_file():
        raise GdroError(f"rollouts.rewards.aesthetic.head: {head} is not a file")
    device = _pick_device(device)
    clip, preprocess, _, torch = _load_open_clip("aesthetic", model, pretrained, model_config, device, quick_gelu)
    dim = int(clip.visual.output_dim)
    mlp = load_aesthetic_head(head, dim).to(device)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        out = [mlp(_image_embeds(clip, preprocess, images[s:s + batch_size], device, torch))[:, 0].cpu().numpy()
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float64), {}

    return fn


def _pickscore_describe(path: str = "", processor_path: str = "", **params) -> dict:
    return {"path": path, "processor_path": processor_path or path, **params,
            "transformers_version": installed_version("transformers")}


def _check_transformers_folder(param: str, value: str, files: tuple[str, ...], what: str) -> Path:
    folder = _need("pickscore", param, value, what)
    if not folder.is_dir() or not any((folder / f).is_file() for f in files):
        raise GdroError(f"rollouts.rewards.pickscore.{param}: {value} is not {what} (it needs one of "
                        f"{', '.join(files)})")
    return folder


@register_reward("pickscore", version="1", describe=_pickscore_describe)
def pickscore(path: str = "", processor_path: str = "", batch_size: int = 16, device: str = ""):
    """exp(logit_scale) x cos(image, prompt) of a transformers CLIPModel from a local folder (module docstring)."""
    folder = _check_transformers_folder("path", path, ("config.json",), "a local transformers CLIPModel folder "
                                        "(config.json + weights, e.g. PickScore_v1)")
    proc_folder = _check_transformers_folder(
        "processor_path", processor_path or path, ("preprocessor_config.json", "processor_config.json"),
        "a local CLIPProcessor folder (preprocessor_config.json + tokenizer files)")
    import torch
    from transformers import CLIPModel, CLIPProcessor

    device = _pick_device(device)
    try:
        processor = CLIPProcessor.from_pretrained(proc_folder, local_files_only=True)
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise GdroError(f"rollouts.rewards.pickscore: cannot load a CLIPModel/CLIPProcessor from {folder} / "
                        f"{proc_folder} ({str(e).splitlines()[0][:300]})") from None

    @torch.no_grad()
    def fn(images, prompts, metadata):
        out = []
        for s in range(0, len(images), batch_size):
            img_in = processor(images=list(np.asarray(images[s:s + batch_size], np.uint8)), return_tensors="pt")
            txt_in = processor(text=list(prompts[s:s + batch_size]), padding=True, truncation=True,
                               max_length=processor.tokenizer.model_max_length, return_tensors="pt")
            img = _features(model.get_image_features(pixel_values=img_in["pixel_values"].to(device)))
            txt = _features(model.get_text_features(**{k: v.to(device) for k, v in txt_in.items()}))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            out.append((model.logit_scale.exp().float() * (img * txt).sum(-1)).cpu().numpy())
        return np.concatenate(out).astype(np.float64), {}

    return fn


def _features(out):
    """transformers 4.x returns the projected embeddings; 5.x may wrap them in a model output."""
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        out = out.pooler_output
    return out.float()

