"""The `ocr` reward: Flow-GRPO's rule on strings (against a brute-force edit distance written here) and on images
rendered with PIL, read by the default engine (RapidOCR, whose wheel ships its models: nothing downloaded)."""
from __future__ import annotations

import functools
import itertools
import random

import numpy as np
import pytest

from pipeline.errors import GdroError
from pipeline.rewards import make_reward, reward_identity
from pipeline.rewards.ocr import levenshtein, ocr_score, ocr_target


def brute_levenshtein(a: str, b: str) -> int:
    """The textbook recursive definition, memoised: no two-row trick, no shared code with the module."""
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_levenshtein_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == brute_levenshtein(a, b), (a, b)
    for a, b in itertools.product(["", "kitten", "sitting", "flaw", "lawn"], repeat=2):
        assert levenshtein(a, b) == brute_levenshtein(a, b)
    assert brute_levenshtein("kitten", "sitting") == 3 and brute_levenshtein("flaw", "lawn") == 2  # the classics


@pytest.mark.parametrize("recognised, target, expected", [
    ("OPEN LATE", "open late", 1.0),                # case and spaces do not count
    ("Cafe: open late tonight", "open late", 1.0),  # a substring counts as exact
    ("openlate", "Open Late", 1.0),
    ("opan late", "open late", 1 - 1 / 8),           # "opanlate" vs "openlate": 1 substitution, n = 8
    ("pen", "open late", 1 - 5 / 8),                 # "pen" vs "openlate": 5 insertions
    ("", "hello", 0.0),                              # nothing read: d = n
    ("xyzxyzxyzxyz", "hello", 0.0),                  # d = 12 > n = 5: capped at n
    ("helo wrld", "hello world", 1 - 2 / 10),        # 2 deletions, n = 10
])
def test_the_rule_by_hand(recognised, target, expected):
    assert ocr_score(recognised, target) == pytest.approx(expected)


def test_the_rule_against_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        t = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 6))).strip() or "a"
        r = "".join(rng.choice("abC ") for _ in range(rng.randint(0, 8)))
        tn, rn = t.replace(" ", "").lower(), r.replace(" ", "").lower()
        want = 1.0 if tn in rn else 1 - min(brute_levenshtein(rn, tn), len(tn)) / len(tn)
        assert ocr_score(r, t) == pytest.approx(want), (r, t)


def test_targets_from_metadata_or_quotes():
    assert ocr_target('a neon sign that says "Open Late" at night', None) == "Open Late"
    assert ocr_target('a sign "a" and "b"', None) == "a"  # the first quoted text, as Flow-GRPO's split('"')[1]
    assert ocr_target("anything", {"ocr_target": "given"}) == "given"
    with pytest.raises(GdroError, match="no target text inside double quotes"):
        ocr_target("a cat on a mat", {})
    with pytest.raises(GdroError, match="empty"):
        ocr_score("abc", "   ")


def render(text: str, size: int = 256, fontsize: int = 30) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=fontsize)
    w = draw.textlength(text, font=font)
    draw.text(((size - w) / 2, size / 2 - fontsize / 2), text, fill=(20, 20, 20), font=font)
    return np.asarray(img)


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr", reason="rapidocr is a gdro dependency (pip install -e .)")
    return make_reward("ocr", {})


def test_images_with_known_text(ocr):
    images = np.stack([render("HELLO WORLD"), render("Open Late"), render("GDRO 2026"),
                       render(""), np.zeros((256, 256, 3), np.uint8),
                       np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)])
    prompts = ['a sign that says "hello world"', 'a neon sign that says "open late"', 'a poster "gdro 2026"',
               'a blank sign "hello"', 'a black image "hello"', 'noise "hello"']
    scores, info = ocr.fn(images, prompts, [{} for _ in prompts])
    assert info["text"][:3] == ["HELLO WORLD", "Open Late", "GDRO 2026"]
    assert scores.tolist()[:3] == [1.0, 1.0, 1.0]
    assert scores.tolist()[3:5] == [0.0, 0.0]  # blank images: no text, no exception
    want = ocr_score(info["text"][5], "hello")  # whatever noise reads as, the rule applies
    assert scores[5] == pytest.approx(want) and scores[5] < 1.0


def test_wrong_and_partial_text_scored_by_the_rule(ocr):
    images = np.stack([render("HELO WRLD"), render("OPEN"), render("GOODBYE")])
    prompts = ['a sign "hello world"', 'a sign "open late"', 'a sign "hello"']
    scores, info = ocr.fn(images, prompts, None)
    assert info["text"] == ["HELO WRLD", "OPEN", "GOODBYE"]
    # "helowrld" vs "helloworld": 2 insertions, n = 10; "open" vs "openlate": 4 insertions, n = 8;
    # "goodbye" vs "hello": distance 7 (the brute force above),
    # capped at n = 5 -> 0
    assert brute_levenshtein("goodbye", "hello") == 7
    assert scores.tolist() == pytest.approx([0.8, 0.5, 0.0])


def test_words_in_separate_boxes_are_joined(ocr):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (320, 320), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    draw.text((20, 60), "OPEN", fill="black", font=font)
    draw.text((180, 220), "LATE", fill="black", font=font)  # far apart: two boxes
    scores, info = ocr.fn(np.asarray(img)[None], ['a sign "open late"'], None)
    assert info["text"] == ["OPENLATE"] and scores.tolist() == [1.0]


def test_manifest_records_the_engine_and_version():
    pytest.importorskip("rapidocr")
    from importlib.metadata import version

    ident = reward_identity("ocr", {})
    assert ident["params"]["backend"] == "rapidocr"
    assert ident["params"]["backend_version"] == version("rapidocr")


def test_bad_parameters_name_the_key(tmp_path):
    with pytest.raises(GdroError, match=r"rollouts.rewards.ocr.backend: 'tesseract'"):
        make_reward("ocr", {"backend": "tesseract"})
    pytest.importorskip("rapidocr")
    with pytest.raises(GdroError, match=r"rollouts.rewards.ocr.det_model_path: .*nope.onnx is not a file"):
        make_reward("ocr", {"det_model_path": str(tmp_path / "nope.onnx")})


def paddle_model_folders(root):
    """PaddleOCR model folders made from the ONNX models the rapidocr wheel ships: inference.onnx plus the
    inference.yml PaddleX would write (its settings; the recogniser's characters from the ONNX file's metadata)."""
    import os
    import shutil

    import onnxruntime as ort
    import rapidocr
    import yaml
    from paddlex.modules.base.utils.pdparams2safetensors.inference_meta import build_inference_meta

    models = os.path.join(os.path.dirname(rapidocr.__file__), "models")
    out = {}
    for kind, name, onnx in (("det", "PP-OCRv6_small_det", "PP-OCRv6_det_small.onnx"),
                             ("rec", "PP-OCRv6_small_rec", "PP-OCRv6_rec_small.onnx")):
        folder = root / kind
        folder.mkdir()
        shutil.copy(os.path.join(models, onnx), folder / "inference.onnx")
        data = {"Global": {"model_name": name}, **build_inference_meta(name)}
        if kind == "rec":
            meta = ort.InferenceSession(str(folder / "inference.onnx")).get_modelmeta().custom_metadata_map
            data.setdefault("PostProcess", {})["character_dict"] = meta["character"].split("\n")
        (folder / "inference.yml").write_text(yaml.safe_dump(data, allow_unicode=True))
        out[f"{kind}_model_dir"] = str(folder)
    return out


def test_paddleocr_with_local_onnx_model_folders(tmp_path):
    """Runs only where `gdro[paddle]` is installed: PaddleOCR on local folders, the same rule, the engine in the
    manifest."""
    pytest.importorskip("paddleocr", reason="PaddleOCR is the optional extra gdro[paddle]")
    pytest.importorskip("rapidocr", reason="the test takes its ONNX models from the rapidocr wheel")
    from importlib.metadata import version

    params = paddle_model_folders(tmp_path)
    ident = reward_identity("ocr", params)  # auto: both folders given -> paddleocr
    assert ident["params"]["backend"] == "paddleocr" and ident["params"]["backend_version"] == version("paddleocr")
    images = np.stack([render("HELLO WORLD"), render("HELO WRLD"), render("")])
    scores, info = make_reward("ocr", params).fn(images, ['a "hello world"'] * 3, None)
    assert info["text"] == ["HELLO WORLD", "HELO WRLD", ""]
    assert scores.tolist() == pytest.approx([1.0, 0.8, 0.0])


def test_paddleocr_needs_local_model_folders(tmp_path):
    """Runs only where `gdro[paddle]` is installed; the folders are refused before PaddleOCR is asked."""
    pytest.importorskip("paddleocr", reason="PaddleOCR is the optional extra gdro[paddle]")
    with pytest.raises(GdroError, match=r"rollouts.rewards.ocr.det_model_dir is not set"):
        make_reward("ocr", {"backend": "paddleocr"})
    (tmp_path / "det").mkdir()
    with pytest.raises(GdroError, match=r"rollouts.rewards.ocr.det_model_dir: .* is not a PaddleOCR model folder"):
        make_reward("ocr", {"backend": "paddleocr", "det_model_dir": str(tmp_path / "det"),
                            "rec_model_dir": str(tmp_path / "det")})
