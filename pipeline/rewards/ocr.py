"""The `ocr` reward: Flow-GRPO's visual-text-rendering score on an offline OCR engine.

The rule (Flow-GRPO's `OcrScorer`, `flow_grpo/ocr.py`): the target is the text inside the prompt's first pair of
double quotes (or `metadata["ocr_target"]`, which `pipeline.prompt_files` fills the same way), lower-cased with every
space removed; the recognised text is every box's text joined in the engine's reading order, lower-cased, spaces
removed. If the target is a substring of it the score is 1.0, else 1 - min(d, n) / n with d the Levenshtein
distance between the recognised text and the target and n the target's length. An image with no text scores
0 (d = n), never raises.

Engines (`backend`), each fully offline:
- `rapidocr` (the default when installed, a dependency of gdro): the `rapidocr` wheel ships PP-OCR's detection
  and recognition models as ONNX files and runs them on onnxruntime. `det_model_path` / `rec_model_path`
  (optional) point at other ONNX files of the same kind.
- `paddleocr` (`pip install 'gdro[paddle]'`): PaddleOCR 3.x, with local model folders only: `det_model_dir` and
  `rec_model_dir`, each holding `inference.onnx` (run on onnxruntime) or Paddle's `inference.json` /
  `inference.pdiparams`, plus PaddleX's `inference.yml`; `det_model_name` / `rec_model_name` name them
  (default PP-OCRv6_small_det / PP-OCRv6_small_rec). PaddleOCR cannot fetch models here, so both dirs are
  required. Such folders can be made from the ONNX files the rapidocr wheel ships (tests/rewards/test_ocr.py,
  `paddle_model_folders`: PaddleX's inference.yml settings, the recogniser's characters from the ONNX metadata).
- `auto` (the default): `paddleocr` when both model dirs are given, else `rapidocr`.

The manifest records the engine actually used and its version (`backend`, `backend_version`), so two datasets
scored by different engines never pass for the same.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import GdroError
from . import installed_version, register_reward

KEY = "rollouts.rewards.ocr"
_QUOTED = re.compile(r'"([^"]*)"')


# ------------------------------------------------------------------------------------------------ the rule
def normalise(text: str) -> str:
    """Lower-case, every space removed (Flow-GRPO's `.replace(' ', '').lower()`)."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward of one image: 1 if the normalised target is a substring of the normalised
    recognised text, else 1 - min(distance, n) / n."""
    t, r = normalise(target), normalise(recognised)
    if not t:
        raise GdroError(f"{KEY}: the OCR target {target!r} is empty once spaces are removed")
    d = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - d / len(t)


def ocr_target(prompt: str, meta: dict | None) -> str:
    """The text an image should show: `meta['ocr_target']`, else the prompt's first quoted text."""
    if meta and meta.get("ocr_target"):
        return str(meta["ocr_target"])
    m = _QUOTED.search(prompt)
    if not m or not m.group(1).strip():
        raise GdroError(f"{KEY}: the prompt {prompt!r} has no target text inside double quotes; the ocr reward "
                        f'needs prompts like: a sign that says "open late"')
    return m.group(1)


# ---------------------------------------------------------------------------------------------- the engines
def _pick_backend(backend: str, det_model_dir: str, rec_model_dir: str) -> str:
    if backend not in ("auto", "rapidocr", "paddleocr"):
        raise GdroError(f"{KEY}.backend: {backend!r} is not an OCR engine; use auto, rapidocr or paddleocr")
    if backend == "auto":
        if det_model_dir and rec_model_dir and installed_version("paddleocr"):
            return "paddleocr"
        if installed_version("rapidocr"):
            return "rapidocr"
        if installed_version("paddleocr"):
            raise GdroError(f"{KEY}: rapidocr is not installed and PaddleOCR needs local model folders: set "
                            f"{KEY}.det_model_dir and {KEY}.rec_model_dir, or pip install rapidocr onnxruntime")
        raise GdroError(f"{KEY}: no OCR engine is installed: pip install rapidocr onnxruntime (or "
                        f"'gdro[paddle]' with local model folders)")
    dist = backend
    if not installed_version(dist):
        extra = "pip install rapidocr onnxruntime" if backend == "rapidocr" else "pip install 'gdro[paddle]'"
        raise GdroError(f"{KEY}.backend: {backend} is not installed ({extra})")
    return backend


def _describe(backend: str = "auto", det_model_dir: str = "", rec_model_dir: str = "", **params) -> dict:
    """The parameters as the manifest records them: the engine resolved and its version."""
    chosen = _pick_backend(backend, det_model_dir, rec_model_dir)
    out = {**params, "backend": chosen, "backend_version": installed_version(chosen)}
    if det_model_dir or rec_model_dir:
        out.update(det_model_dir=det_model_dir, rec_model_dir=rec_model_dir)
    return out


def _file(key: str, value: str) -> str:
    if value and not Path(value).is_file():
        raise GdroError(f"{KEY}.{key}: {value} is not a file; point it at a local ONNX model (or leave it unset "
                        f"for the models the rapidocr wheel ships)")
    return value


def _rapidocr(det_model_path: str, rec_model_path: str, limit_side_len: int):
    from rapidocr import RapidOCR

    params = {"Global.use_cls": False, "Global.log_level": "error",
              "Det.limit_type": "max", "Det.limit_side_len": int(limit_side_len)}
    if _file("det_model_path", det_model_path):
        params["Det.model_path"] = det_model_path
    if _file("rec_model_path", rec_model_path):
        params["Rec.model_path"] = rec_model_path
    engine = RapidOCR(params=params)

    def read(img: np.ndarray) -> list[tuple[str, float]]:
        res = engine(np.ascontiguousarray(img[..., ::-1]))  # RapidOCR takes arrays in OpenCV's BGR order
        txts = getattr(res, "txts", None) or ()
        scores = getattr(res, "scores", None) or (1.0,) * len(txts)
        return [(str(t), float(s)) for t, s in zip(txts, scores)]

    return read


def _paddleocr(det_model_dir: str, rec_model_dir: str, det_model_name: str, rec_model_name: str):
    for key, value in (("det_model_dir", det_model_dir), ("rec_model_dir", rec_model_dir)):
        if not value:
            raise GdroError(f"{KEY}.{key} is not set: PaddleOCR cannot fetch models here; point it at a local "
                            f"model folder (inference.onnx or inference.json + inference.pdiparams, inference.yml)")
        folder = Path(value)
        if not (folder / "inference.yml").is_file() or not any(
                (folder / f).is_file() for f in ("inference.onnx", "inference.json", "inference.pdmodel")):
            raise GdroError(f"{KEY}.{key}: {value} is not a PaddleOCR model folder (it needs inference.yml and "
                            f"inference.onnx, or Paddle's inference.json + inference.pdiparams)")
    from paddleocr import PaddleOCR

    onnx = all((Path(d) / "inference.onnx").is_file() for d in (det_model_dir, rec_model_dir))
    engine = PaddleOCR(**({"engine": "onnxruntime"} if onnx else {}),
                       text_detection_model_name=det_model_name, text_detection_model_dir=det_model_dir,
                       text_recognition_model_name=rec_model_name, text_recognition_model_dir=rec_model_dir,
                       use_doc_orientation_classify=False, use_doc_unwarping=False, use_textline_orientation=False)

    def read(img: np.ndarray) -> list[tuple[str, float]]:
        out = []
        for res in engine.predict(np.ascontiguousarray(img[..., ::-1])):  # BGR, as PaddleOCR reads files
            out += [(str(t), float(s)) for t, s in zip(res["rec_texts"], res["rec_scores"])]
        return out

    return read


@register_reward("ocr", version="1", describe=_describe, per_image=True)
def ocr(backend: str = "auto", min_confidence: float = 0.0, limit_side_len: int = 960,
        det_model_path: str = "", rec_model_path: str = "", det_model_dir: str = "", rec_model_dir: str = "",
        det_model_name: str = "PP-OCRv6_small_det", rec_model_name: str = "PP-OCRv6_small_rec"):
    """Flow-GRPO's OCR reward (module docstring). Boxes whose confidence is not above `min_confidence` are
    dropped (Flow-GRPO: > 0); `limit_side_len` caps the longer image side the detector sees (rapidocr)."""
    chosen = _pick_backend(backend, det_model_dir, rec_model_dir)
    if chosen == "rapidocr":
        read = _rapidocr(det_model_path, rec_model_path, limit_side_len)
    else:
        read = _paddleocr(det_model_dir, rec_model_dir, det_model_name, rec_model_name)

    def fn(images, prompts, metadata):
        metadata = metadata if metadata is not None else [None] * len(prompts)
        targets = [ocr_target(p, m) for p, m in zip(prompts, metadata)]  # all checked before any OCR runs
        scores, texts = [], []
        for img, target in zip(np.asarray(images), targets):
            text = "".join(t for t, s in read(img) if s > min_confidence)
            texts.append(text)
            scores.append(ocr_score(text, target))
        return np.array(scores, np.float64), {"text": texts}

    return fn
