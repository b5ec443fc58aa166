"""The `geneval` reward: GenEval's rules on a plug-in detector's boxes. The box relation against hand-computed
cases, the rules on hand-made detections, and the plug-in path end to end with the toy world's own parser as
the detector, where it must agree with the toy verifier image for image."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import GdroError
from pipeline.rewards import make_reward
from pipeline.rewards.geneval import judge_detections, relative_position

DETECTOR = f"{__name__}:toy_detector"  # this module, as pytest imported it


def toy_detector(threshold_bump: float = 0.0):
    """A plug-in in the documented form, built on the toy world's parser (boxes from the components)."""
    from pipeline.toy.verifier import parse

    def detect(images):
        out = []
        for img in images:
            dets = []
            for d in parse(img).detections:
                if d.shape is None:
                    continue
                half = np.sqrt(d.area) / 2
                dets.append({"label": d.shape, "box": [d.cx - half, d.cy - half, d.cx + half, d.cy + half],
                             "score": min(1.0, 0.95 + threshold_bump), "color": d.color})
            out.append(dets)
        return out

    return detect


@pytest.mark.parametrize("a, b, expected", [
    # boxes [x0, y0, x1, y1]; A's centre minus B's, less 0.1 x (A's + B's size) per axis, over the offset's norm
    ([0, 0, 10, 10], [20, 0, 30, 10], {"left of"}),     # dx = -20 -> -(20 - 2) / 20 = -0.9
    ([20, 0, 30, 10], [0, 0, 10, 10], {"right of"}),
    ([0, 0, 10, 10], [0, 20, 10, 30], {"above"}),       # y grows downwards
    ([0, 30, 10, 40], [0, 0, 10, 10], {"below"}),
    ([0, 0, 10, 10], [20, 20, 30, 30], {"left of", "above"}),  # (-18, -18) / 28.28 = -0.64 each
    ([0, 0, 10, 10], [20, 8, 30, 18], {"left of"}),     # offset (-20, -8): dx -18 / 21.5 = -0.84, dy -6 / 21.5 = -0.28
    ([0, 0, 10, 10], [1, 1, 11, 11], set()),            # |offset| 1 < 0.1 x 20 on both axes: no relation
    ([0, 0, 10, 10], [10, 17, 20, 27], {"above"}),      # offset (-10, -17): dx -8 / 19.7 = -0.41, dy -15 / 19.7 = -0.76
])
def test_relative_position_by_hand(a, b, expected):
    assert relative_position(a, b) == expected


def det(label, box, score=0.9, color=None):
    return {"label": label, "box": box, "score": score, "color": color}


def test_rules_on_hand_made_detections():
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    v = judge_detections([det("cat", [0, 0, 5, 5]), det("dog", [10, 10, 20, 20])], two)
    assert (v.strict, v.partial) == (True, 1.0)
    v = judge_detections([det("cat", [0, 0, 5, 5]), det("dog", [10, 10, 20, 20], score=0.2)], two)  # below 0.3
    assert (v.strict, v.partial) == (False, 0.5)

    count = {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}]}
    apples = [det("apple", [i * 10, 0, i * 10 + 5, 5], score=0.95) for i in range(3)]
    assert judge_detections(apples, count).strict
    low = apples[:2] + [det("apple", [40, 0, 45, 5], score=0.5)]  # counting lines need > 0.9
    v = judge_detections(low, count)
    assert (v.strict, v.partial) == (False, pytest.approx(2 / 3))  # 1 - |2 - 3| / 3
    v = judge_detections(apples + [det("apple", [50, 0, 55, 5], score=0.95)], count)  # 4 >= exclude's 4
    assert not v.strict and v.partial == 1.0 - 1 / 3  # partial: 1 - min(|4 - 3|, 3) / 3

    color = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert judge_detections([det("car", [0, 0, 9, 9], color="red")], color).strict
    v = judge_detections([det("car", [0, 0, 9, 9], color="blue")], color)
    assert (v.strict, v.partial) == (False, 0.5)  # the class is there in another colour

    pos = {"tag": "position", "include": [{"class": "cup", "count": 1},
                                          {"class": "clock", "count": 1, "position": ["left of", 0]}]}
    assert judge_detections([det("cup", [20, 0, 30, 10]), det("clock", [0, 0, 10, 10])], pos).strict
    v = judge_detections([det("cup", [0, 0, 10, 10]), det("clock", [20, 0, 30, 10])], pos)
    assert (v.strict, v.partial) == (False, 0.75)  # (1 + 0.5) / 2: the clock is there, on the wrong side
    v = judge_detections([det("cup", [20, 0, 30, 10]), det("clock", [0, 0, 10, 10])], {**pos, "tag": "x"})
    assert v.strict


def test_bad_metadata_and_detections():
    with pytest.raises(GdroError, match="no GenEval metadata"):
        judge_detections([], {"prompt": "a cat"})
    with pytest.raises(GdroError, match=r"rollouts.rewards.geneval.detector: detection 0 is not"):
        judge_detections([{"label": "cat"}], {"include": [{"class": "cat", "count": 1}]})
    with pytest.raises(GdroError, match=r"box of 2 numbers"):
        judge_detections([det("cat", [1, 2])], {"include": [{"class": "cat", "count": 1}]})


def test_the_detector_must_be_plugged_in():
    with pytest.raises(GdroError, match=r"rollouts.rewards.geneval.detector is not set: .* gdro does not ship"):
        make_reward("geneval", {})
    with pytest.raises(GdroError, match=r"rollouts.rewards.geneval.detector: cannot import nowhere:detect"):
        make_reward("geneval", {"detector": "nowhere:detect"})
    with pytest.raises(GdroError, match=r"rollouts.rewards.geneval.score: 'soft'"):
        make_reward("geneval", {"detector": DETECTOR, "score": "soft"})


def test_the_toy_parser_as_plug_in_agrees_with_the_toy_verifier():
    """Same rules, same verdicts: true renders, renders of other prompts' scenes, and noise, on every kind but
    `position` (the toy verifier compares centres, GenEval's rule compares boxes)."""
    from pipeline.prompt_files import load_prompts
    from pipeline.toy.prompts import sample_scene
    from pipeline.toy.world import render

    metas = [m for m in load_prompts("prompts/toy_test.jsonl") if m["tag"] != "position"][::5]
    rng = np.random.default_rng(0)
    images = []
    for i, m in enumerate(metas):
        if i % 3 == 0:
            images.append(render(sample_scene(m, rng)))
        elif i % 3 == 1:
            images.append(render(sample_scene(metas[(i * 7) % len(metas)], rng)))
        else:
            images.append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    images = np.stack(images)
    prompts = [m["prompt"] for m in metas]
    ours, info = make_reward("geneval", {"detector": DETECTOR}).fn(images, prompts, metas)
    partial, toy_info = make_reward("toy_geneval").fn(images, prompts, metas)
    np.testing.assert_array_equal(ours, partial)
    np.testing.assert_array_equal(info["strict"], toy_info["strict"])
    assert 0 < info["strict"].mean() < 1  # both verdicts occur
    strict, _ = make_reward("geneval", {"detector": DETECTOR, "score": "strict"}).fn(images, prompts, metas)
    np.testing.assert_array_equal(strict, toy_info["strict"])
    # the threshold applies: detections at 0.95 - 0.7 = 0.25 < 0.3 are dropped, nothing is found
    none, _ = make_reward("geneval", {"detector": DETECTOR, "detector_params": {"threshold_bump": -0.7}}).fn(
        images, prompts, metas)
    assert none.max() == 0.0
