"""Synthetic SugarCrepe and SugarCrepe++ sets: two coloured shapes per image, in the benchmarks' file formats.

A scene is ``((colour, kind), relation, (colour, kind))``, "a red circle left of a blue square";
each subset's hard negative edits its caption the way the subset's name says. The images are drawn
by the one renderer (``shapes.render``) in its palette; captions and negatives depend on the seed alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from g2e_jax.data.sugarcrepe import SUGARCREPE, SUGARCREPE_PP, Format
from g2e_jax.data.synthetic.scenes import pick
from g2e_jax.data.synthetic.shapes import COLORS, SHAPES, Scene, Shape, png, render

COLOURS = tuple(COLORS)[:5]  # red, green, blue, yellow, purple: the five most easily told apart
KINDS = SHAPES[:3]  # circle, square, triangle
SIZE, RADIUS, BACKGROUND = 84, 13, (245, 245, 245)
# Centre of the first and of the second object for "a <first> <relation> a <second>".
RELATIONS = {
    "left of": ((21, 42), (63, 42)),
    "right of": ((63, 42), (21, 42)),
    "above": ((42, 21), (42, 63)),
    "below": ((42, 63), (42, 21)),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _scene(scene, rng) -> Scene:
    """The two objects at their relation's places, each moved up to 4 pixels either way."""
    (c1, s1), relation, (c2, s2) = scene
    shapes = []
    for (colour, kind), (x, y) in zip(((c1, s1), (c2, s2)), RELATIONS[relation]):
        x, y = x + int(rng.integers(-4, 5)), y + int(rng.integers(-4, 5))
        shapes.append(Shape(kind, colour, x, y, RADIUS, 0.0))
    return Scene(SIZE, BACKGROUND, tuple(shapes))


def _pair(scene, subset: str, rng) -> tuple[str, str]:
    """(caption, hard negative) of one scene, the negative built the way ``subset`` names."""
    (c1, s1), rel, (c2, s2) = scene

    def text(c1, s1, rel, c2, s2):
        return f"a {c1} {s1} {rel} a {c2} {s2}".replace("  ", " ")

    caption = text(c1, s1, rel, c2, s2)
    first = bool(rng.integers(2))
    if subset == "replace_obj":
        new = pick(rng, KINDS, (s1, s2))
        return caption, text(c1, new, rel, c2, s2) if first else text(c1, s1, rel, c2, new)
    if subset == "replace_att":
        new = pick(rng, COLOURS, (c1, c2))
        return caption, text(new, s1, rel, c2, s2) if first else text(c1, s1, rel, new, s2)
    if subset == "replace_rel":
        return caption, text(c1, s1, pick(rng, RELATIONS, (rel,)), c2, s2)
    if subset == "swap_obj":
        return caption, text(c1, s2, rel, c2, s1)
    if subset == "swap_att":
        return caption, text(c2, s1, rel, c1, s2)
    if subset == "add_obj":
        extra = f"{pick(rng, COLOURS, (c1, c2))} {pick(rng, KINDS, (s1, s2))}"
        return caption, f"{caption} and a {extra}"
    if subset == "add_att":  # the caption leaves one colour out; the negative adds a wrong one
        new = pick(rng, COLOURS, (c1, c2))
        if first:
            return text("", s1, rel, c2, s2), text(new, s1, rel, c2, s2)
        return text(c1, s1, rel, "", s2), text(c1, s1, rel, new, s2)
    raise ValueError(f"unknown SugarCrepe subset {subset!r}")


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


def _write_synthetic(out_dir, seed: int, items_per_subset: int, fmt: Format) -> tuple[Path, Path]:
    if items_per_subset < 1:
        raise ValueError(f"items_per_subset must be at least 1, got {items_per_subset}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    relations = list(RELATIONS)
    pool = []
    for _ in range(2 * items_per_subset):
        i, j = rng.choice(len(COLOURS), 2, replace=False)
        k, m = rng.choice(len(KINDS), 2, replace=False)
        rel = relations[int(rng.integers(len(relations)))]
        pool.append(((COLOURS[i], KINDS[k]), rel, (COLOURS[j], KINDS[m])))
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
        scene = _scene(pool[p], np.random.default_rng([seed, p]))
        (image_dir / f"{p:012d}.png").write_bytes(png(render(scene)))
    return out_dir, image_dir
