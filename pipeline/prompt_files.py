"""Prompt files in the formats the field uses, read into GenEval-style metadata dicts. The one loader of gdro.

- ``.txt``: one prompt per line (Flow-GRPO's `dataset/{ocr,pickscore}/*.txt`); blank lines are skipped.
- ``.jsonl``: one JSON object per line with at least a string ``prompt``; GenEval's ``evaluation_metadata.jsonl``
  lines (``{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, group index]}],
  "exclude"?: [{"class", "count"}], "prompt"}``) are checked field by field, so a detector never meets a
  malformed line mid-run.
- The OCR convention, in either format: the text inside the prompt's first pair of double quotes is the text
  the image must show; it becomes ``ocr_target`` (a line's own ``ocr_target`` wins).

Every record gets ``prompt`` and ``tag`` (its own, else ``ocr`` for a quoted target, else ``prompt``). Errors
name the file, the line and the field.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import GdroError

_QUOTED = re.compile(r'"([^"]+)"')
RELATIONS = ("left of", "right of", "above", "below")  # GenEval's positions
FORMATS = {".txt": "one prompt per line", ".jsonl": "one JSON object per line (GenEval metadata)"}


def load_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise GdroError(f"prompt file {path} does not exist")
    if path.suffix not in FORMATS:
        raise GdroError(f"prompt file {path}: unknown format {path.suffix or '(no suffix)'!r}; use "
                        + " or ".join(f"{s} ({what})" for s, what in FORMATS.items()))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GdroError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GdroError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise GdroError(f"{path}:{n}: each line needs a non-empty string field 'prompt'")
            check_geneval(rec, f"{path}:{n}")
        else:
            rec = {"prompt": line.strip()}
        match = _QUOTED.search(rec["prompt"])
        rec.setdefault("tag", "ocr" if match else "prompt")
        if match and "ocr_target" not in rec:
            rec["ocr_target"] = match.group(1)
        if "ocr_target" in rec and (not isinstance(rec["ocr_target"], str) or not rec["ocr_target"].strip()):
            raise GdroError(f"{path}:{n}: 'ocr_target' must be a non-empty string")
        records.append(rec)
    if not records:
        raise GdroError(f"prompt file {path} holds no prompts")
    return records


def check_geneval(rec: dict, where: str) -> None:
    """GenEval's metadata fields, where a line has them: `include` (and `exclude`) lists of objects."""
    if "tag" in rec and not isinstance(rec["tag"], str):
        raise GdroError(f"{where}: 'tag' must be a string, got {rec['tag']!r}")
    if "include" not in rec:
        if "exclude" in rec:
            raise GdroError(f"{where}: 'exclude' without 'include'")
        return
    for field in ("include", "exclude"):
        items = rec.get(field, [])
        if not isinstance(items, list) or (field == "include" and not items):
            raise GdroError(f"{where}: '{field}' must be a {'non-empty ' if field == 'include' else ''}list of "
                            f'objects like {{"class": "cat", "count": 1}}')
        for k, obj in enumerate(items):
            at = f"{where}: {field}[{k}]"
            if not isinstance(obj, dict) or not isinstance(obj.get("class"), str) or not obj["class"]:
                raise GdroError(f"{at} needs a string 'class'")
            count = obj.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise GdroError(f"{at}.count must be an integer >= 1, got {count!r}")
            if field == "exclude":
                continue
            if "color" in obj and not isinstance(obj["color"], str):
                raise GdroError(f"{at}.color must be a string, got {obj['color']!r}")
            if "position" in obj:
                pos = obj["position"]
                if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int) or isinstance(pos[1], bool) or not 0 <= pos[1] < k):
                    raise GdroError(f"{at}.position must be [relation, index of an earlier include entry] with "
                                    f"relation one of {', '.join(RELATIONS)}, got {pos!r}")
