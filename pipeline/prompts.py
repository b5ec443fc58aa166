"""Prompt files in the formats the field uses, read into GenEval-style metadata dicts.

- ``.jsonl``: GenEval's ``evaluation_metadata.jsonl`` (one dict per line with at least ``prompt``).
- ``.txt``: one prompt per line; an OCR target is the text inside the first pair of double quotes.
Every record gets ``prompt`` and ``tag``; OCR prompts also ``ocr_target``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import GdroError

_QUOTED = re.compile(r'"([^"]+)"')


def load_prompts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise GdroError(f"prompt file {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GdroError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise GdroError(f"{path}:{n}: each line needs a string field 'prompt'")
        else:
            rec = {"prompt": line.strip()}
        rec.setdefault("tag", "ocr" if _QUOTED.search(rec["prompt"]) else "prompt")
        match = _QUOTED.search(rec["prompt"])
        if match and "ocr_target" not in rec:
            rec["ocr_target"] = match.group(1)
        records.append(rec)
    if not records:
        raise GdroError(f"prompt file {path} holds no prompts")
    return records
