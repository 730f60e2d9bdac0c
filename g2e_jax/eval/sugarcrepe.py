"""SugarCrepe (Hsieh et al., 2023): does the image score its true caption above a hard negative?

The official data is one ``<subset>.json`` per subset, a dict ``id -> {"filename", "caption",
"negative_caption"}`` over COCO val2017 images. Captions are queries (with a retrieval instruction
prepended), images are documents (the bare image in the document template); an item is right when
``score(image, caption) > score(image, negative_caption)``, ties counting as wrong.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from g2e_jax.io import write_atomic
from g2e_jax.prompts import IMAGE_MARKER

if TYPE_CHECKING:
    from g2e_jax.embed import Embedder

SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
QUERY_PREFIX = "Find me an image that matches the given caption: "
KEYS = ("filename", "caption", "negative_caption")


class SugarCrepeError(ValueError):
    """Unusable SugarCrepe data; the message names the file and, where one is to blame, the item id."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    filename: str
    image: Path  # image_dir / filename, checked to exist
    caption: str
    negative_caption: str


# --- loading ---------------------------------------------------------------------------------------


def _check_subsets(subsets: str | Sequence[str]) -> tuple[str, ...]:
    subsets = (subsets,) if isinstance(subsets, str) else tuple(subsets)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown SugarCrepe subset(s) {unknown}; valid: {', '.join(SUBSETS)}")
    if not subsets:
        raise ValueError("no SugarCrepe subsets requested")
    return tuple(dict.fromkeys(subsets))


def _missing_subset_message(path: Path, data_dir: Path) -> str:
    if not data_dir.is_dir():
        return f"{path}: SugarCrepe subset file not found (the data folder {data_dir} does not exist)"
    present = [f"{s}.json" for s in SUBSETS if (data_dir / f"{s}.json").is_file()]
    if present:
        found = f"subset files present in {data_dir}: {', '.join(present)}"
    else:
        others = sorted(p.name for p in data_dir.glob("*.json"))
        found = f"none of the {len(SUBSETS)} subset files is in {data_dir}" + (
            f" (other JSON files there: {', '.join(others[:10])}{', ...' if len(others) > 10 else ''})"
            if others
            else ""
        )
    return f"{path}: SugarCrepe subset file not found; {found}"


def _load_subset(path: Path, image_dir: Path) -> list[Item]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise SugarCrepeError(f"{path}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise SugarCrepeError(f"{path}: invalid JSON: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise SugarCrepeError(
            f"{path}: expected a JSON object mapping item id -> item, got {type(data).__name__}"
        )
    if not data:
        raise SugarCrepeError(f"{path}: no items")
    items = []
    for item_id, entry in data.items():
        where = f"{path}: item {item_id!r}"
        if not isinstance(entry, dict):
            raise SugarCrepeError(
                f"{where}: expected an object with keys {list(KEYS)}, got {type(entry).__name__}"
            )
        for key in KEYS:
            if key not in entry:
                raise SugarCrepeError(f"{where}: missing key {key!r} (has {sorted(entry)})")
            if not isinstance(entry[key], str):
                raise SugarCrepeError(f"{where}: {key!r} must be a string, got {type(entry[key]).__name__}")
        image = image_dir / entry["filename"]
        if not entry["filename"] or not image.is_file():
            raise SugarCrepeError(f"{where}: image file not found: {image}")
        items.append(
            Item(str(item_id), entry["filename"], image, entry["caption"], entry["negative_caption"])
        )
    return items


def load_sugarcrepe(
    data_dir: str | Path, image_dir: str | Path, subsets: str | Sequence[str] = SUBSETS
) -> dict[str, list[Item]]:
    """Every item of each requested subset, in file order; fails on the first bad file or item,
    before any (slow) encoding starts."""
    data_dir, image_dir = Path(data_dir), Path(image_dir)
    subsets = _check_subsets(subsets)
    if not image_dir.is_dir():
        raise SugarCrepeError(f"{image_dir}: image folder not found (expected COCO val2017 images)")
    out = {}
    for name in subsets:
        path = data_dir / f"{name}.json"
        if not path.is_file():
            raise SugarCrepeError(_missing_subset_message(path, data_dir))
        out[name] = _load_subset(path, image_dir)
    return out


# --- scoring ---------------------------------------------------------------------------------------


def pairwise_accuracy(image_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray) -> float:
    """Share of rows whose image scores the positive strictly above the negative (ties are wrong)."""
    positive = np.einsum("nd,nd->n", image_emb, positive_emb)
    negative = np.einsum("nd,nd->n", image_emb, negative_emb)
    return float(np.mean(positive > negative))


def summarize(subsets: Mapping[str, Mapping[str, float | int]]) -> dict:
    """Per-subset results plus their mean and the replace/swap/add group means (groups with no
    evaluated subset are left out)."""
    result = {"subsets": {name: dict(subsets[name]) for name in subsets}}
    result["average"] = float(np.mean([r["accuracy"] for r in subsets.values()]))
    for group, members in GROUPS.items():
        present = [subsets[m]["accuracy"] for m in members if m in subsets]
        if present:
            result[group] = float(np.mean(present))
    return result


def evaluate_sugarcrepe(
    embedder: Embedder,
    data_dir: str | Path,
    image_dir: str | Path,
    subsets: str | Sequence[str] = SUBSETS,
    *,
    progress: bool = True,
) -> dict:
    """``{"subsets": {name: {"accuracy", "n"}}, "average", "replace", "swap", "add"}``.

    Each distinct image is encoded once for all subsets (they share COCO images); each distinct
    caption once per subset.
    """
    data = load_sugarcrepe(data_dir, image_dir, subsets)
    images = list(dict.fromkeys(item.image for items in data.values() for item in items))
    image_emb = embedder.encode([IMAGE_MARKER] * len(images), images, role="document", progress=progress)
    image_row = {image: i for i, image in enumerate(images)}
    results = {}
    for name, items in data.items():
        captions = list(dict.fromkeys(c for item in items for c in (item.caption, item.negative_caption)))
        caption_emb = embedder.encode([QUERY_PREFIX + c for c in captions], role="query", progress=progress)
        caption_row = {c: i for i, c in enumerate(captions)}
        accuracy = pairwise_accuracy(
            image_emb[[image_row[item.image] for item in items]],
            caption_emb[[caption_row[item.caption] for item in items]],
            caption_emb[[caption_row[item.negative_caption] for item in items]],
        )
        results[name] = {"accuracy": accuracy, "n": len(items)}
    return summarize(results)


# --- report ----------------------------------------------------------------------------------------


def write_sugarcrepe_report(results: Mapping, out_dir: str | Path) -> tuple[Path, Path]:
    """``sugarcrepe.json`` (the results as they are) and ``sugarcrepe.md`` (accuracies in %)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subsets = results["subsets"]
    lines = ["# SugarCrepe", "", "| subset | n | accuracy (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['n']} | {100 * r['accuracy']:.2f} |" for name, r in subsets.items()]
    for group, members in GROUPS.items():
        if group in results:
            n = sum(subsets[m]["n"] for m in members if m in subsets)
            lines.append(f"| **{group}** | {n} | {100 * results[group]:.2f} |")
    n = sum(r["n"] for r in subsets.values())
    lines.append(f"| **average** | {n} | {100 * results['average']:.2f} |")
    json_path, md_path = out_dir / "sugarcrepe.json", out_dir / "sugarcrepe.md"
    write_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_atomic(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


# --- synthetic data --------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
# Centre of the first and of the second object for "a <first> <relation> a <second>".
RELATIONS = {
    "left of": ((21, 42), (63, 42)),
    "right of": ((63, 42), (21, 42)),
    "above": ((42, 21), (42, 63)),
    "below": ((42, 63), (42, 21)),
}


def _draw(scene, rng, size: int = 84):
    from PIL import Image, ImageDraw

    (c1, s1), relation, (c2, s2) = scene
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for (colour, shape), (x, y) in zip(((c1, s1), (c2, s2)), RELATIONS[relation]):
        x, y, r = x + int(rng.integers(-4, 5)), y + int(rng.integers(-4, 5)), 13
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(((x, y - r), (x - r, y + r), (x + r, y + r)), fill=fill)
    return img


def _other(rng, options, exclude):
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _pair(scene, subset: str, rng) -> tuple[str, str]:
    """(caption, hard negative) of one scene, the negative built the way ``subset`` names."""
    (c1, s1), rel, (c2, s2) = scene

    def text(c1, s1, rel, c2, s2):
        return f"a {c1} {s1} {rel} a {c2} {s2}".replace("  ", " ")

    caption = text(c1, s1, rel, c2, s2)
    first = bool(rng.integers(2))
    if subset == "replace_obj":
        new = _other(rng, SHAPES, (s1, s2))
        return caption, text(c1, new, rel, c2, s2) if first else text(c1, s1, rel, c2, new)
    if subset == "replace_att":
        new = _other(rng, COLOURS, (c1, c2))
        return caption, text(new, s1, rel, c2, s2) if first else text(c1, s1, rel, new, s2)
    if subset == "replace_rel":
        return caption, text(c1, s1, _other(rng, RELATIONS, (rel,)), c2, s2)
    if subset == "swap_obj":
        return caption, text(c1, s2, rel, c2, s1)
    if subset == "swap_att":
        return caption, text(c2, s1, rel, c1, s2)
    if subset == "add_obj":
        extra = f"{_other(rng, COLOURS, (c1, c2))} {_other(rng, SHAPES, (s1, s2))}"
        return caption, f"{caption} and a {extra}"
    if subset == "add_att":  # the caption leaves one colour out; the negative adds a wrong one
        new = _other(rng, COLOURS, (c1, c2))
        if first:
            return text("", s1, rel, c2, s2), text(new, s1, rel, c2, s2)
        return text(c1, s1, rel, "", s2), text(c1, s1, rel, new, s2)
    raise ValueError(f"unknown SugarCrepe subset {subset!r}")


def make_synthetic_sugarcrepe(
    out_dir: str | Path, *, seed: int = 0, items_per_subset: int = 6
) -> tuple[Path, Path]:
    """SugarCrepe-format data of two coloured shapes per 84x84 image, for tests and the demo.

    Writes ``out_dir/<subset>.json`` for all seven subsets and ``out_dir/images/*.png``; subsets
    draw from one pool of scenes, so they share images as the real ones share COCO images.
    Deterministic from ``seed``. Returns ``(data_dir, image_dir)``.
    """
    if items_per_subset < 1:
        raise ValueError(f"items_per_subset must be at least 1, got {items_per_subset}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, relations = list(COLOURS), list(RELATIONS)
    pool = []
    for _ in range(2 * items_per_subset):
        i, j = rng.choice(len(colours), 2, replace=False)
        k, m = rng.choice(len(SHAPES), 2, replace=False)
        rel = relations[int(rng.integers(len(relations)))]
        pool.append(((colours[i], SHAPES[k]), rel, (colours[j], SHAPES[m])))
    used = set()
    for subset in SUBSETS:
        picks = rng.choice(len(pool), items_per_subset, replace=False)
        entries = {}
        for n, p in enumerate(picks):
            caption, negative = _pair(pool[p], subset, rng)
            entries[str(n)] = {
                "filename": f"{int(p):012d}.png",
                "caption": caption,
                "negative_caption": negative,
            }
            used.add(int(p))
        (out_dir / f"{subset}.json").write_text(json.dumps(entries, indent=1) + "\n")
    for p in sorted(used):
        _draw(pool[p], np.random.default_rng([seed, p])).save(image_dir / f"{p:012d}.png")
    return out_dir, image_dir
