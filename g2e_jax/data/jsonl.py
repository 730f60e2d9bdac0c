"""JSON lines files: the one line reader (``json_lines``), and the rows of ``g2e-jax embed``, one
JSON object per line, ``{"id", "text", "image"}``.

Every problem is reported with the file, the line number, the id (when known) and the field, so
a user can fix the input; with ``skip_bad`` the row is set aside with its reason instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from g2e_jax.paths import resolve_from


@dataclasses.dataclass(frozen=True)
class InvalidJSON:
    """A line that does not parse, in place of its object: the caller reports or raises it."""

    msg: str
    column: int

    @property
    def reason(self) -> str:
        return f"invalid JSON ({self.msg} at column {self.column})"


def json_lines(path: str | Path, *, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value or ``InvalidJSON``) of every non-blank line, streamed.
    ``errors`` decodes the bytes (``"replace"``: a checker that must report, not stop)."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, InvalidJSON(e.msg, e.colno)


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
        return f"{path} {self.where()}"

    def where(self) -> str:
        who = f"line {self.line}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{who}, field {self.field!r}: {self.reason}"

    def to_json(self) -> dict:
        return {"line": self.line, "id": self.id, "field": self.field, "reason": self.reason}


MAX_LISTED = 20  # bad rows named one by one in an error; the rest are counted


def bad_rows_error(path, bad: list[BadRow]) -> ValueError:
    """One error for every bad row (the first ``MAX_LISTED`` by line, then a count): the file is fixed once."""
    bad = sorted(bad, key=lambda b: b.line)
    rows = "row" if len(bad) == 1 else "rows"
    head = f"{path}: {len(bad)} bad {rows} (fix, or pass --skip-bad to set them aside in skipped.jsonl):"
    lines = [head] + [f"  {b.where()}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return ValueError("\n".join(lines))


def read_embed_rows(path: str | Path, *, skip_bad: bool = False) -> tuple[list[EmbedRow], list[BadRow]]:
    """Parses and validates the file. Relative image paths are relative to the file's folder.

    Without ``skip_bad`` bad rows raise one ValueError naming all of them (``bad_rows_error``); with
    it, they are returned apart (a duplicate id always keeps the first occurrence).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    rows, bad, seen = [], [], {}
    for number, obj in json_lines(path):
        row = _parse(path, number, obj, seen)
        if isinstance(row, BadRow):
            bad.append(row)
        else:
            seen[row.id] = number
            rows.append(row)
    if bad and not skip_bad:
        raise bad_rows_error(path, bad)
    return rows, bad


def _parse(path: Path, number: int, obj, seen: dict) -> EmbedRow | BadRow:
    if isinstance(obj, InvalidJSON):
        return BadRow(number, None, "<line>", obj.reason)
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
        image = resolve_from(path, image)
    if not text.strip() and image is None:
        return BadRow(number, row_id, "text", "empty text and no image: nothing to embed")
    unknown = sorted(set(obj) - {"id", "text", "image"})
    if unknown:
        return BadRow(number, row_id, unknown[0], f"unknown field(s) {unknown}; expected id, text, image")
    return EmbedRow(number, row_id, text, image)
