"""SugarCrepe and SugarCrepe++ scores of an embedder: the metrics, the evaluation, and their reports.

Captions are queries (with a retrieval instruction prepended), images are documents (the bare image in
the document template). SugarCrepe: an item is right when ``score(image, caption) >
score(image, negative_caption)``, ties counting as wrong. SugarCrepe++ scores an item twice as the
official ``cli/evaluate_sugarcrepe_plus.py`` does (DESIGN.md §5): image-to-text right when both
captions score above the negative; text-only right when ``cos(c1, c2)`` is above both
``cos(c1, neg)`` and ``cos(c2, neg)`` (strictly: ties are wrong).

The file formats and loaders live in ``g2e_jax.data.sugarcrepe``, the synthetic sets in
``g2e_jax.data.synthetic``; both are re-exported here, where the README has always named them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from g2e_jax.data.sugarcrepe import (
    KEYS,
    PP_KEYS,
    PP_SUBSETS,
    SUBSETS,
    Item,
    SugarCrepeError,
    load_sugarcrepe,
    load_sugarcrepe_pp,
)
from g2e_jax.data.synthetic.sugarcrepe import make_synthetic_sugarcrepe, make_synthetic_sugarcrepe_pp
from g2e_jax.io import write_atomic
from g2e_jax.prompts import IMAGE_MARKER

if TYPE_CHECKING:
    from g2e_jax.embed import Embedder

__all__ = [
    "GROUPS", "KEYS", "PP_KEYS", "PP_SUBSETS", "QUERY_PREFIX", "SUBSETS", "Item", "SugarCrepeError",
    "evaluate_sugarcrepe", "evaluate_sugarcrepe_pp", "load_sugarcrepe", "load_sugarcrepe_pp",
    "make_synthetic_sugarcrepe", "make_synthetic_sugarcrepe_pp", "pairwise_accuracy", "pp_average",
    "sugarcrepe_markdown", "sugarcrepe_pp_markdown", "summarize", "triplet_accuracies", "write_sugarcrepe_report",
]  # fmt: skip

GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
QUERY_PREFIX = "Find me an image that matches the given caption: "


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
