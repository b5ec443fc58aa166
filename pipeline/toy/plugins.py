"""The toy world plugged into generic code: its rewards (the reward registry imports this module by name) and its
verifier as evaluation sees it (`ToyVerifier`, reached through the toy backend's `BackendSpec.verifier`)."""
from __future__ import annotations

import numpy as np

from ..rewards import register_reward


class ToyVerifier:
    """The toy verifier as a `pipeline.eval.fixed_noise.Verifier`: GenEval's strict verdict, partial credit and the
    out-of-domain quality and no-extra-object share of every image, besides the registered rewards; grid cells framed by the strict
    verdict; the console's win rate on partial credit (graded, so fewer ties than strict's 0/1)."""

    metrics = ("strict", "partial", "quality", "no_extra")
    win_metric = "partial"
    win_label = "partial-credit"
    frame_legend = "green frame = strict pass; "

    def score(self, images: np.ndarray, metas: list[dict]) -> dict[str, np.ndarray]:
        from .scoring import score_images

        return score_images(images, metas)

    def passes(self, image: np.ndarray, meta: dict) -> bool:
        from .verifier import verify

        return verify(image, meta)[0].strict


@register_reward("toy_geneval", version="1", per_image=True)
def toy_geneval():
    """GenEval rules on the toy world: score = partial credit; info['strict'] = GenEval's all-correct."""
    from .verifier import verify

    def fn(images, prompts, metadata):
        verdicts = [verify(img, meta)[0] for img, meta in zip(images, metadata)]
        return (np.array([v.partial for v in verdicts]),
                {"strict": np.array([float(v.strict) for v in verdicts])})

    return fn


@register_reward("toy_exact", version="1", per_image=True)
def toy_exact():
    """`toy_geneval`'s partial credit, halved when the image holds any object beyond those the prompt names
    (`verifier.extra_objects`): GenEval's rules with the loophole closed that a reward run otherwise finds (draw
    more, and one of them will be right). A training reward; `no_extra` stops being out of domain for a run
    trained on it."""
    from .verifier import extra_objects, verify

    def fn(images, prompts, metadata):
        out = []
        for img, meta in zip(images, metadata):
            verdict, parsed = verify(img, meta)
            out.append(verdict.partial * (0.5 if extra_objects(parsed.detections, meta) else 1.0))
        return np.array(out), {}

    return fn


@register_reward("toy_strict", version="1", per_image=True)
def toy_strict():
    """GenEval's strict all-correct (0/1) on the toy world."""
    from .verifier import verify

    def fn(images, prompts, metadata):
        return np.array([float(verify(img, meta)[0].strict) for img, meta in zip(images, metadata)]), {}

    return fn


@register_reward("toy_quality", version="1", per_image=True)
def toy_quality():
    """Out-of-domain image quality of toy scenes (shape fidelity x colour purity); never looks at the prompt."""
    from .verifier import parse

    def fn(images, prompts, metadata):
        return np.array([parse(img).quality for img in images]), {}

    return fn


@register_reward("toy_color_area", version="1", per_image=True)
def toy_color_area():
    """DELIBERATELY EXPLOITABLE, for the reward-hacking demonstration (`make hack-demo`, docs/evaluation.md):
    the share of pixels whose nearest palette colour is one the prompt names (any palette colour if it names
    none). A model pleases it by painting larger blobs of the right colours, whatever their shape or number."""
    from .verifier import _COLOR_NAMES, _COLOR_RGB

    def fn(images, prompts, metadata):
        rgb = np.asarray(images, np.float32)
        label = np.linalg.norm(rgb[..., None, :] - _COLOR_RGB, axis=-1).argmin(-1)  # [N, H, W]; 0 = background
        out = []
        for lab, meta in zip(label, metadata):
            named = {o["color"] for o in (meta or {}).get("include", []) if o.get("color")}
            ids = [i for i, c in enumerate(_COLOR_NAMES) if c in named] if named else range(1, len(_COLOR_NAMES))
            out.append(float(np.isin(lab, list(ids)).mean()))
        return np.array(out), {}

    return fn


