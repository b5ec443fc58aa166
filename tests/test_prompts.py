"""The prompt loader (`pipeline.prompt_files.load_prompts`): plain text, GenEval metadata JSONL, the OCR convention,
bad input named by file, line and field, and the shipped samples the presets point at."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ExperimentConfig, resolve
from pipeline.errors import GdroError
from pipeline.prompt_files import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


def test_plain_text(tmp_path):
    recs = load_prompts(write(tmp_path, "p.txt", "a cat on a mat\n\n   \n  a red fox at dawn  \n"))
    assert recs == [{"prompt": "a cat on a mat", "tag": "prompt"}, {"prompt": "a red fox at dawn", "tag": "prompt"}]


def test_ocr_convention(tmp_path):
    recs = load_prompts(write(tmp_path, "o.txt", 'A sign that says "Open Late" at night\n'
                                                 'a "first" and a "second"\n'
                                                 'an unclosed "quote\n'))
    assert recs[0] == {"prompt": 'A sign that says "Open Late" at night', "tag": "ocr", "ocr_target": "Open Late"}
    assert recs[1]["ocr_target"] == "first"  # the first pair of quotes, as Flow-GRPO's split('"')[1]
    assert recs[2] == {"prompt": 'an unclosed "quote', "tag": "prompt"}
    j = load_prompts(write(tmp_path, "o.jsonl", json.dumps({"prompt": 'a mug "Hi"'}) + "\n"
                           + json.dumps({"prompt": 'a mug "Hi"', "ocr_target": "Hello", "tag": "mine"}) + "\n"))
    assert j[0] == {"prompt": 'a mug "Hi"', "tag": "ocr", "ocr_target": "Hi"}
    assert j[1]["ocr_target"] == "Hello" and j[1]["tag"] == "mine"  # the line's own fields win


def test_geneval_metadata(tmp_path):
    lines = [{"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
              "prompt": "a photo of three apples"},
             {"tag": "position", "include": [{"class": "chair", "count": 1},
                                             {"class": "cat", "count": 1, "position": ["left of", 0]}],
              "prompt": "a photo of a cat left of a chair"},
             {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}]
    recs = load_prompts(write(tmp_path, "g.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    assert recs == lines  # kept as they are: a detector reads GenEval's own fields


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat"', r"g.jsonl:2: not valid JSON"),
    ('["a cat"]', r"g.jsonl:2: each line needs a non-empty string field 'prompt'"),
    ('{"prompt": ""}', r"g.jsonl:2: each line needs a non-empty string field 'prompt'"),
    ('{"prompt": "p", "include": []}', r"g.jsonl:2: 'include' must be a non-empty list"),
    ('{"prompt": "p", "include": [{"count": 1}]}', r"g.jsonl:2: include\[0\] needs a string 'class'"),
    ('{"prompt": "p", "include": [{"class": "cat", "count": 0}]}', (r"g.jsonl:2: include\[0\].count must be an "
                                                                    r"integer >= 1, got 0")),
    ('{"prompt": "p", "include": [{"class": "cat", "count": "2"}]}', r"include\[0\].count must be an integer"),
    ('{"prompt": "p", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}',
     r"g.jsonl:2: include\[0\].position must be \[relation, index of an earlier include entry\]"),
    ('{"prompt": "p", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]}',
     r"include\[1\].position must be .*got \['near', 0\]"),
    ('{"prompt": "p", "include": [{"class": "a", "count": 1}], "exclude": [{"class": "a"}]}',
     r"g.jsonl:2: exclude\[0\].count must be an integer"),
    ('{"prompt": "p", "exclude": [{"class": "a", "count": 2}]}', r"g.jsonl:2: 'exclude' without 'include'"),
    ('{"prompt": "p", "include": [{"class": "a", "count": 1, "color": 3}]}', r"include\[0\].color must be a string"),
    ('{"prompt": "p", "tag": 5}', r"g.jsonl:2: 'tag' must be a string"),
    ('{"prompt": "p", "ocr_target": " "}', r"g.jsonl:2: 'ocr_target' must be a non-empty string"),
])
def test_bad_jsonl_lines_name_file_line_and_field(tmp_path, line, message):
    f = write(tmp_path, "g.jsonl", '{"prompt": "a fine first line"}\n' + line + "\n")
    with pytest.raises(GdroError, match=message):
        load_prompts(f)


def test_bad_files(tmp_path):
    with pytest.raises(GdroError, match=r"p.csv: unknown format '.csv'; use .txt .* or .jsonl"):
        load_prompts(write(tmp_path, "p.csv", "a cat\n"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(GdroError, match=r"latin.txt is not UTF-8 text \(byte 3\)"):
        load_prompts(tmp_path / "latin.txt")
    with pytest.raises(GdroError, match="holds no prompts"):
        load_prompts(write(tmp_path, "e.jsonl", "\n\n"))


@pytest.mark.parametrize("preset", ["toy", "sd35_ocr", "flux_ocr", "sd35_geneval", "sd35_pickscore"])
def test_the_presets_prompt_files_ship_and_load(preset):
    cfg = resolve(ExperimentConfig, preset=preset)
    for path in (cfg.rollouts.prompts, cfg.eval.prompts):
        recs = load_prompts(ROOT / path)
        assert len(recs) >= 10
        if "ocr" in preset:
            assert all(r["tag"] == "ocr" and r["ocr_target"].strip() for r in recs)
        if "geneval" in preset:
            assert {r["tag"] for r in recs} == {"single_object", "two_object", "counting", "colors", "position",
                                                "color_attr"}
    train = {r["prompt"] for r in load_prompts(ROOT / cfg.rollouts.prompts)}
    assert not train & {r["prompt"] for r in load_prompts(ROOT / cfg.eval.prompts)}  # held out
