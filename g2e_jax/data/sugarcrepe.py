"""The SugarCrepe and SugarCrepe++ file formats: their subsets, their items, and loaders that check them.

SugarCrepe (Hsieh et al., 2023): one ``<subset>.json`` per subset, a dict ``id -> {"filename",
"caption", "negative_caption"}`` over COCO val2017 images. SugarCrepe++ (Dumpala et al., 2024) adds
``caption2``, a paraphrase of ``caption``: each ``<subset>.json`` is a list of ``{"caption",
"caption2", "negative_caption", "filename"}`` (a dict ``id -> item`` is read too). The loaders fail on
the first bad file or item with a message naming it, before any (slow) encoding starts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
PP_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel")  # SugarCrepe++'s five
KEYS = ("filename", "caption", "negative_caption")
PP_KEYS = ("filename", "caption", "caption2", "negative_caption")


class SugarCrepeError(ValueError):
    """Unusable SugarCrepe data; the message names the file and, where one is to blame, the item id."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    filename: str
    image: Path  # image_dir / filename, checked to exist
    caption: str
    negative_caption: str
    caption2: str | None = None  # SugarCrepe++ only: a paraphrase of ``caption``


@dataclasses.dataclass(frozen=True)
class Format:
    """What one benchmark's files look like: its name (for messages), subsets and item keys."""

    name: str
    subsets: tuple[str, ...]
    keys: tuple[str, ...]
    lists: bool  # items may come as a JSON list (ids are list positions) as well as a dict id -> item


SUGARCREPE = Format("SugarCrepe", SUBSETS, KEYS, lists=False)
SUGARCREPE_PP = Format("SugarCrepe++", PP_SUBSETS, PP_KEYS, lists=True)


def _check_subsets(subsets: str | Sequence[str], fmt: Format = SUGARCREPE) -> tuple[str, ...]:
    subsets = (subsets,) if isinstance(subsets, str) else tuple(subsets)
    unknown = [s for s in subsets if s not in fmt.subsets]
    if unknown:
        raise ValueError(f"unknown {fmt.name} subset(s) {unknown}; valid: {', '.join(fmt.subsets)}")
    if not subsets:
        raise ValueError(f"no {fmt.name} subsets requested")
    return tuple(dict.fromkeys(subsets))


def _missing_subset_message(path: Path, data_dir: Path, fmt: Format = SUGARCREPE) -> str:
    if not data_dir.is_dir():
        return f"{path}: {fmt.name} subset file not found (the data folder {data_dir} does not exist)"
    present = [f"{s}.json" for s in fmt.subsets if (data_dir / f"{s}.json").is_file()]
    if present:
        found = f"subset files present in {data_dir}: {', '.join(present)}"
    else:
        others = sorted(p.name for p in data_dir.glob("*.json"))
        found = f"none of the {len(fmt.subsets)} subset files is in {data_dir}" + (
            f" (other JSON files there: {', '.join(others[:10])}{', ...' if len(others) > 10 else ''})"
            if others
            else ""
        )
    return f"{path}: {fmt.name} subset file not found; {found}"


def _load_subset(path: Path, image_dir: Path, fmt: Format = SUGARCREPE) -> list[Item]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise SugarCrepeError(f"{path}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise SugarCrepeError(f"{path}: invalid JSON: not UTF-8 text ({e})") from None
    if fmt.lists and isinstance(data, list):
        data = {str(i): entry for i, entry in enumerate(data)}
    if not isinstance(data, dict):
        expected = (
            "a JSON list of items or an object mapping item id -> item"
            if fmt.lists
            else ("a JSON object mapping item id -> item")
        )
        raise SugarCrepeError(f"{path}: expected {expected}, got {type(data).__name__}")
    if not data:
        raise SugarCrepeError(f"{path}: no items")
    items = []
    for item_id, entry in data.items():
        where = f"{path}: item {item_id!r}"
        if not isinstance(entry, dict):
            raise SugarCrepeError(
                f"{where}: expected an object with keys {list(fmt.keys)}, got {type(entry).__name__}"
            )
        for key in fmt.keys:
            if key not in entry:
                raise SugarCrepeError(f"{where}: missing key {key!r} (has {sorted(entry)})")
            if not isinstance(entry[key], str):
                raise SugarCrepeError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")
        image = image_dir / entry["filename"]
        if not entry["filename"] or not image.is_file():
            raise SugarCrepeError(f"{where}: image file not found: {image}")
        items.append(
            Item(
                str(item_id),
                entry["filename"],
                image,
                entry["caption"],
                entry["negative_caption"],
                entry.get("caption2"),
            )
        )
    return items


def _load(data_dir, image_dir, subsets, fmt: Format) -> dict[str, list[Item]]:
    data_dir, image_dir = Path(data_dir), Path(image_dir)
    subsets = _check_subsets(subsets, fmt)
    if not image_dir.is_dir():
        raise SugarCrepeError(f"{image_dir}: image folder not found (expected COCO val2017 images)")
    out = {}
    for name in subsets:
        path = data_dir / f"{name}.json"
        if not path.is_file():
            raise SugarCrepeError(_missing_subset_message(path, data_dir, fmt))
        out[name] = _load_subset(path, image_dir, fmt)
    return out


def load_sugarcrepe(
    data_dir: str | Path, image_dir: str | Path, subsets: str | Sequence[str] = SUBSETS
) -> dict[str, list[Item]]:
    """Every item of each requested subset, in file order; fails on the first bad file or item,
    before any (slow) encoding starts."""
    return _load(data_dir, image_dir, subsets, SUGARCREPE)


def load_sugarcrepe_pp(
    data_dir: str | Path, image_dir: str | Path, subsets: str | Sequence[str] | None = None
) -> dict[str, list[Item]]:
    """SugarCrepe++ items (with ``caption2``) of each requested subset (None: all five), in file order;
    like ``load_sugarcrepe`` it fails on the first bad file or item before any encoding."""
    return _load(data_dir, image_dir, PP_SUBSETS if subsets is None else subsets, SUGARCREPE_PP)
