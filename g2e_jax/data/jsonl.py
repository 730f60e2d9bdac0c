"""Rows for ``g2e-jax embed``: one JSON object per line, ``{"id", "text", "image"}``.

Every problem is reported with the file, the line number, the id (when known) and the field, so
a user can fix the input; with ``skip_bad`` the row is set aside with its reason instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class EmbedRow:
    line: int  # 1-based line number in the file
    id: str
    text: str
    image: str | None  # absolute path, or None


@dataclasses.dataclass(frozen=True)
class BadRow:
    line: int
    id: str | None
    field: str
    reason: str

    def message(self, path) -> str:
        who = f"line {self.line}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{path} {who}, field {self.field!r}: {self.reason}"

    def to_json(self) -> dict:
        return {"line": self.line, "id": self.id, "field": self.field, "reason": self.reason}


def read_embed_rows(path: str | Path, *, skip_bad: bool = False) -> tuple[list[EmbedRow], list[BadRow]]:
    """Parses and validates the file. Relative image paths are relative to the file's folder.

    Without ``skip_bad`` the first bad row raises ValueError; with it, bad rows are returned apart
    (a duplicate id always keeps the first occurrence).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    rows, bad, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse(path, number, line, seen)
            if isinstance(row, BadRow):
                if not skip_bad:
                    raise ValueError(row.message(path))
                bad.append(row)
            else:
                seen[row.id] = number
                rows.append(row)
    return rows, bad


def _parse(path: Path, number: int, line: str, seen: dict) -> EmbedRow | BadRow:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(number, None, "<line>", f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return BadRow(number, None, "<line>", f"expected a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return BadRow(
            number,
            None,
            "id",
            "missing" if raw_id is None else f"expected a string or integer, got {raw_id!r}",
        )
    row_id = str(raw_id)
    if row_id in seen:
        return BadRow(number, row_id, "id", f"duplicate id (first seen on line {seen[row_id]})")
    text, image = obj.get("text"), obj.get("image")
    if text is None:
        text = ""
    if not isinstance(text, str):
        return BadRow(number, row_id, "text", f"expected a string, got {type(text).__name__}")
    if image is not None and not isinstance(image, str):
        return BadRow(number, row_id, "image", f"expected a path string or null, got {type(image).__name__}")
    if image is not None:
        image = str((path.parent / image).resolve()) if not Path(image).is_absolute() else image
    if not text.strip() and image is None:
        return BadRow(number, row_id, "text", "empty text and no image: nothing to embed")
    unknown = sorted(set(obj) - {"id", "text", "image"})
    if unknown:
        return BadRow(number, row_id, unknown[0], f"unknown field(s) {unknown}; expected id, text, image")
    return EmbedRow(number, row_id, text, image)
