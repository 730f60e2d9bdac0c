"""SugarCrepe (Hsieh et al., 2023) and SugarCrepe++ (Dumpala et al., 2024): compositional hard negatives.

SugarCrepe: one ``<subset>.json`` per subset, a dict ``id -> {"filename", "caption",
"negative_caption"}`` over COCO val2017 images. Captions are queries (with a retrieval instruction
prepended), images are documents (the bare image in the document template); an item is right when
``score(image, caption) > score(image, negative_caption)``, ties counting as wrong.

SugarCrepe++ adds ``caption2``, a paraphrase of ``caption``: each ``<subset>.json`` is a list of
``{"caption", "caption2", "negative_caption", "filename"}`` (a dict ``id -> item`` is read too), and an
item is scored twice as the official ``cli/evaluate_sugarcrepe_plus.py`` does (DESIGN.md §5):
image-to-text right when both captions score above the negative; text-only right when
``cos(c1, c2)`` is above both ``cos(c1, neg)`` and ``cos(c2, neg)`` (strictly: ties are wrong).
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
PP_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel")  # SugarCrepe++'s five
QUERY_PREFIX = "Find me an image that matches the given caption: "
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
class _Format:
    """What one benchmark's files look like: its name (for messages), subsets and item keys."""

    name: str
    subsets: tuple[str, ...]
    keys: tuple[str, ...]
    lists: bool  # items may come as a JSON list (ids are list positions) as well as a dict id -> item


SUGARCREPE = _Format("SugarCrepe", SUBSETS, KEYS, lists=False)
SUGARCREPE_PP = _Format("SugarCrepe++", PP_SUBSETS, PP_KEYS, lists=True)


# --- loading ---------------------------------------------------------------------------------------


def _check_subsets(subsets: str | Sequence[str], fmt: _Format = SUGARCREPE) -> tuple[str, ...]:
    subsets = (subsets,) if isinstance(subsets, str) else tuple(subsets)
    unknown = [s for s in subsets if s not in fmt.subsets]
    if unknown:
        raise ValueError(f"unknown {fmt.name} subset(s) {unknown}; valid: {', '.join(fmt.subsets)}")
    if not subsets:
        raise ValueError(f"no {fmt.name} subsets requested")
    return tuple(dict.fromkeys(subsets))


def _missing_subset_message(path: Path, data_dir: Path, fmt: _Format = SUGARCREPE) -> str:
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


def _load_subset(path: Path, image_dir: Path, fmt: _Format = SUGARCREPE) -> list[Item]:
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


def _load(data_dir, image_dir, subsets, fmt: _Format) -> dict[str, list[Item]]:
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
    image_emb = _encode_images(embedder, data, progress)
    results = {}
    for name, items in data.items():
        caption = _encode_captions(embedder, items, ("caption", "negative_caption"), progress)
        accuracy = pairwise_accuracy(
            image_emb[[item.image for item in items]], caption["caption"], caption["negative_caption"]
        )
        results[name] = {"accuracy": accuracy, "n": len(items)}
    return summarize(results)


def evaluate_sugarcrepe_pp(
    embedder: Embedder,
    data_dir: str | Path,
    image_dir: str | Path,
    subsets: str | Sequence[str] | None = None,
    *,
    progress: bool = True,
) -> dict[str, dict]:
    """SugarCrepe++ as the official script scores it: per subset ``{"image_to_text": %, "text_only": %,
    "total": n}`` (None: all five subsets, in the order given).

    Captions (``caption``, ``caption2``, ``negative_caption``) are queries with ``QUERY_PREFIX``, each
    distinct one encoded once per subset; images are documents, each distinct one encoded once.
    """
    data = load_sugarcrepe_pp(data_dir, image_dir, subsets)
    image_emb = _encode_images(embedder, data, progress)
    results = {}
    for name, items in data.items():
        e = _encode_captions(embedder, items, ("caption", "caption2", "negative_caption"), progress)
        image_to_text, text_only = triplet_accuracies(
            image_emb[[item.image for item in items]], e["caption"], e["caption2"], e["negative_caption"]
        )
        results[name] = {
            "image_to_text": 100 * image_to_text,
            "text_only": 100 * text_only,
            "total": len(items),
        }
    return results


def triplet_accuracies(image, caption, caption2, negative) -> tuple[float, float]:
    """(image-to-text, text-only) shares of rows right, rows being ``[N, D]`` unit vectors: both
    captions above the negative for the image; the captions closer to each other than either is to
    the negative. Strict comparisons: ties are wrong."""

    def dot(a, b):
        return np.einsum("nd,nd->n", a, b)

    neg = dot(image, negative)
    image_to_text = (dot(image, caption) > neg) & (dot(image, caption2) > neg)
    pair = dot(caption, caption2)
    text_only = (pair > dot(caption, negative)) & (pair > dot(caption2, negative))
    return float(np.mean(image_to_text)), float(np.mean(text_only))


class _Rows:
    """Embeddings indexed by the key they were encoded for (an image path, a caption)."""

    def __init__(self, keys: list, emb: np.ndarray):
        self.row, self.emb = {k: i for i, k in enumerate(keys)}, emb

    def __getitem__(self, keys: list) -> np.ndarray:
        return self.emb[[self.row[k] for k in keys]]


def _encode_images(embedder, data: Mapping[str, list[Item]], progress) -> _Rows:
    """Each distinct image once for all subsets (they share COCO images), in the document template."""
    images = list(dict.fromkeys(item.image for items in data.values() for item in items))
    return _Rows(
        images, embedder.encode([IMAGE_MARKER] * len(images), images, role="document", progress=progress)
    )


def _encode_captions(embedder, items: list[Item], fields: tuple[str, ...], progress) -> dict[str, np.ndarray]:
    """``{field: [N, D]}``: every distinct caption of the subset once, as a query with ``QUERY_PREFIX``."""
    captions = list(dict.fromkeys(getattr(item, f) for item in items for f in fields))
    rows = _Rows(
        captions, embedder.encode([QUERY_PREFIX + c for c in captions], role="query", progress=progress)
    )
    return {f: rows[[getattr(item, f) for item in items]] for f in fields}


# --- report ----------------------------------------------------------------------------------------


def sugarcrepe_markdown(results: Mapping) -> str:
    """The SugarCrepe table: accuracy (%) per subset, per group and on average."""
    subsets = results["subsets"]
    lines = ["# SugarCrepe", "", "| subset | n | accuracy (%) |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['n']} | {100 * r['accuracy']:.2f} |" for name, r in subsets.items()]
    for group, members in GROUPS.items():
        if group in results:
            n = sum(subsets[m]["n"] for m in members if m in subsets)
            lines.append(f"| **{group}** | {n} | {100 * results[group]:.2f} |")
    n = sum(r["n"] for r in subsets.values())
    lines.append(f"| **average** | {n} | {100 * results['average']:.2f} |")
    return "\n".join(lines) + "\n"


def write_sugarcrepe_report(results: Mapping, out_dir: str | Path) -> tuple[Path, Path]:
    """``sugarcrepe.json`` (the results as they are) and ``sugarcrepe.md`` (accuracies in %)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "sugarcrepe.json", out_dir / "sugarcrepe.md"
    write_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_atomic(md_path, sugarcrepe_markdown(results))
    return json_path, md_path


def pp_average(results: Mapping[str, Mapping]) -> dict:
    """The mean of the subsets' accuracies (each subset weighs the same) and the total item count."""
    return {
        "image_to_text": float(np.mean([r["image_to_text"] for r in results.values()])),
        "text_only": float(np.mean([r["text_only"] for r in results.values()])),
        "total": int(sum(r["total"] for r in results.values())),
    }


def sugarcrepe_pp_markdown(results: Mapping[str, Mapping]) -> str:
    """The SugarCrepe++ table: image-to-text and text-only accuracy (%) per subset and on average."""
    lines = [
        "# SugarCrepe++",
        "",
        "| subset | n | image-to-text (%) | text-only (%) |",
        "|---|---:|---:|---:|",
    ]
    rows = list(results.items()) + [("**average**", pp_average(results))]
    lines += [
        f"| {name} | {r['total']} | {r['image_to_text']:.2f} | {r['text_only']:.2f} |" for name, r in rows
    ]
    return "\n".join(lines) + "\n"


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


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _paraphrase(scene) -> str:
    """The same scene described from the second object: "a blue square right of a red circle"."""
    (c1, s1), rel, (c2, s2) = scene
    return f"a {c2} {s2} {INVERSE[rel]} a {c1} {s1}"


def make_synthetic_sugarcrepe(
    out_dir: str | Path, *, seed: int = 0, items_per_subset: int = 6
) -> tuple[Path, Path]:
    """SugarCrepe-format data of two coloured shapes per 84x84 image, for tests and the demo.

    Writes ``out_dir/<subset>.json`` for all seven subsets and ``out_dir/images/*.png``; subsets
    draw from one pool of scenes, so they share images as the real ones share COCO images.
    Deterministic from ``seed``. Returns ``(data_dir, image_dir)``.
    """
    return _write_synthetic(out_dir, seed, items_per_subset, SUGARCREPE)


def make_synthetic_sugarcrepe_pp(
    out_dir: str | Path, *, seed: int = 0, items_per_subset: int = 6
) -> tuple[Path, Path]:
    """SugarCrepe++-format data (the five subsets, JSON lists of ``{caption, caption2,
    negative_caption, filename}``) over the same kind of scenes: ``caption2`` says the caption's
    relation from the other object (same meaning, other words), the negative changes the meaning as
    the subset names. Deterministic from ``seed``. Returns ``(data_dir, image_dir)``."""
    return _write_synthetic(out_dir, seed, items_per_subset, SUGARCREPE_PP)


def _write_synthetic(out_dir, seed: int, items_per_subset: int, fmt: _Format) -> tuple[Path, Path]:
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
    for subset in fmt.subsets:
        picks = rng.choice(len(pool), items_per_subset, replace=False)
        entries = []
        for p in picks:
            caption, negative = _pair(pool[p], subset, rng)
            entry = {"filename": f"{int(p):012d}.png", "caption": caption, "negative_caption": negative}
            if "caption2" in fmt.keys:
                entry = {
                    "caption": caption,
                    "caption2": _paraphrase(pool[p]),
                    "negative_caption": negative,
                    "filename": entry["filename"],
                }
            entries.append(entry)
            used.add(int(p))
        data = entries if fmt.lists else {str(n): entry for n, entry in enumerate(entries)}
        (out_dir / f"{subset}.json").write_text(json.dumps(data, indent=1) + "\n")
    for p in sorted(used):
        _draw(pool[p], np.random.default_rng([seed, p])).save(image_dir / f"{p:012d}.png")
    return out_dir, image_dir
