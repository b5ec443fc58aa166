"""The toy prompt space: deterministic split, disjoint pools, balanced lists, and shipped files = generator output.

The shipped prompts/toy_*.jsonl files are what every run trains and evaluates on; they must be exactly what the
generator writes, so a change to the generator cannot silently leave stale files (or vice versa).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.toy.prompts import (
    KINDS,
    NUMBERS,
    RELATIONS,
    all_prompts,
    balanced_list,
    enumerate_kind,
    split_pools,
    write_prompt_files,
)
from pipeline.toy.world import COLORS, PLURALS, SHAPES

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
SINGULAR = {v: k for k, v in PLURALS.items()}
WORD_TO_N = {v: k for k, v in NUMBERS.items()}

# Prompt counts per kind, by hand: 3 shapes; 3*2 ordered pairs; 3 shapes * 3 numbers; 6 colours * 3 shapes;
# 6 ordered pairs * 4 relations; (18 * 17 ordered coloured-shape pairs) - (3 shapes * 6 * 5 same-shape pairs).
SIZES = {"single_object": 3, "two_object": 6, "counting": 9, "colors": 18, "position": 24, "color_attr": 216}
# Test share per kind: max(1, round(0.3 * size)).
TEST_SIZES = {"single_object": 1, "two_object": 2, "counting": 3, "colors": 5, "position": 7, "color_attr": 65}


def _texts(pool: list[dict]) -> list[str]:
    return [p["prompt"] for p in pool]


def test_enumeration_sizes():
    assert {k: len(enumerate_kind(k)) for k in KINDS} == SIZES
    assert len(all_prompts()) == sum(SIZES.values()) == 276


def test_split_is_deterministic():
    assert split_pools() == split_pools()


def test_split_partitions_the_space():
    """Train and test are disjoint by prompt text and together are the whole space; sizes as worked out above."""
    train, test = split_pools()
    assert not set(_texts(train)) & set(_texts(test))
    assert sorted(_texts(train) + _texts(test)) == sorted(_texts(all_prompts()))
    assert Counter(p["tag"] for p in test) == TEST_SIZES
    assert Counter(p["tag"] for p in train) == {k: SIZES[k] - TEST_SIZES[k] for k in KINDS}


def test_every_kind_in_both_pools():
    train, test = split_pools()
    assert {p["tag"] for p in train} == set(KINDS) == {p["tag"] for p in test}


def test_split_depends_on_seed():
    """Another seed gives another split (the seed is actually used)."""
    assert _texts(split_pools(seed=1)[1]) != _texts(split_pools()[1])


@pytest.mark.parametrize("n", [1, 6, 7, 61, 300])
def test_balanced_list_round_robin(n):
    """Kinds interleave in KINDS order; within a kind, the pool is cycled in its own order."""
    train, _ = split_pools()
    out = balanced_list(train, n)
    assert len(out) == n
    assert [p["tag"] for p in out] == [KINDS[i % len(KINDS)] for i in range(n)]
    for k in KINDS:
        own = [p for p in train if p["tag"] == k]
        got = [p for p in out if p["tag"] == k]
        assert got == [own[j % len(own)] for j in range(len(got))]


def test_shipped_files_are_generator_output(tmp_path):
    """prompts/toy_train.jsonl and toy_test.jsonl are byte-identical to what write_prompt_files writes now."""
    train_path, test_path = write_prompt_files(tmp_path)
    assert train_path.read_bytes() == (PROMPTS_DIR / "toy_train.jsonl").read_bytes()
    assert test_path.read_bytes() == (PROMPTS_DIR / "toy_test.jsonl").read_bytes()


def test_shipped_files_balanced_and_disjoint():
    """2000 / 300 lines, every kind equally often (to within one), no test prompt in the train file."""
    lines = {name: [json.loads(s) for s in (PROMPTS_DIR / f"toy_{name}.jsonl").read_text().splitlines()]
             for name in ("train", "test")}
    assert len(lines["train"]) == 2000 and len(lines["test"]) == 300
    assert Counter(p["tag"] for p in lines["test"]) == dict.fromkeys(KINDS, 50)
    counts = Counter(p["tag"] for p in lines["train"]).values()
    assert max(counts) - min(counts) <= 1
    assert not set(_texts(lines["train"])) & set(_texts(lines["test"]))
    space = all_prompts()
    assert all(p in space for p in lines["train"] + lines["test"])


def _obj(cls: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    d: dict = {"class": cls, "count": count}
    if color is not None:
        d["color"] = color
    if position is not None:
        d["position"] = position
    return d


def parse_prompt(tag: str, text: str) -> dict:
    """Rebuild GenEval metadata from a prompt's words alone (an independent reading of the templates)."""
    shape, color, num = "|".join(SHAPES), "|".join(COLORS), "|".join(NUMBERS.values())
    rel = "|".join(RELATIONS)
    plural = "|".join(PLURALS.values())
    pats = {
        "single_object": rf"a photo of a ({shape})",
        "two_object": rf"a photo of a ({shape}) and a ({shape})",
        "counting": rf"a photo of ({num}) ({plural})",
        "colors": rf"a photo of a ({color}) ({shape})",
        "position": rf"a photo of a ({shape}) ({rel}) a ({shape})",
        "color_attr": rf"a photo of a ({color}) ({shape}) and a ({color}) ({shape})",
    }
    m = re.fullmatch(pats[tag], text)
    assert m, (tag, text)
    g = m.groups()
    if tag == "single_object":
        inc = [_obj(g[0])]
    elif tag == "two_object":
        inc = [_obj(g[0]), _obj(g[1])]
    elif tag == "counting":
        n, cls = WORD_TO_N[g[0]], SINGULAR[g[1]]
        return {"tag": tag, "include": [_obj(cls, n)], "exclude": [_obj(cls, n + 1)], "prompt": text}
    elif tag == "colors":
        inc = [_obj(g[1], color=g[0])]
    elif tag == "position":  # "<moved> <rel> <ref>": the reference is group 0, the moved object points at it
        inc = [_obj(g[2]), _obj(g[0], position=[g[1], 0])]
    else:
        inc = [_obj(g[1], color=g[0]), _obj(g[3], color=g[2])]
    return {"tag": tag, "include": inc, "prompt": text}


def test_prompt_text_matches_metadata():
    """Every prompt's words say exactly what its metadata asks (class, colour, count, relation)."""
    for p in all_prompts():
        assert parse_prompt(p["tag"], p["prompt"]) == p


def test_prompt_texts_unique():
    texts = _texts(all_prompts())
    assert len(texts) == len(set(texts))


def test_color_attr_pairs_two_different_classes():
    for p in enumerate_kind("color_attr"):
        assert p["include"][0]["class"] != p["include"][1]["class"]


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="nope"):
        enumerate_kind("nope")
