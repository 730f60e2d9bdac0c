"""Random scenes: non-overlapping layouts, the labels a task wants drawn, and captions that name them.

Every choice is drawn from the caller's ``numpy.random.Generator``, in a fixed order, so a seed gives
the same scenes (the MMEB set's bytes depend on that order: keep it when editing).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from g2e_jax.data.synthetic.shapes import COLORS, SHAPES, Scene, Shape


def pick(rng: np.random.Generator, options, exclude=()):
    """One of ``options`` (not in ``exclude``), uniformly."""
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _radius_range(size: int, n: int) -> tuple[int, int]:
    frac = {1: (0.13, 0.32), 2: (0.1, 0.2)}.get(n, (0.09, 0.155))
    return max(3, round(frac[0] * size)), max(4, round(frac[1] * size))


def _place(rng: np.random.Generator, size: int, n: int, gap: int = 3) -> list[tuple[int, int, int]]:
    """(cx, cy, r) for n objects whose circumscribed circles keep ``gap`` pixels apart (never touching)."""
    lo, hi = _radius_range(size, n)
    for _ in range(1000):
        placed: list[tuple[int, int, int]] = []
        for _ in range(n):
            for _ in range(100):
                r = int(rng.integers(lo, hi + 1))
                cx = int(rng.integers(r + 2, size - r - 2))
                cy = int(rng.integers(r + 2, size - r - 2))
                if all(math.hypot(cx - x, cy - y) >= r + q + gap for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            return placed
        hi = max(lo, hi - 1)  # crowded: shrink and retry
    raise RuntimeError(f"cannot place {n} shapes in a {size}px image")


def random_scene(rng: np.random.Generator, size: int, attrs: list[tuple[str, str]]) -> Scene:
    """The objects ``attrs`` ((kind, colour) each) placed at random on a light background."""
    background = tuple(int(v) for v in rng.integers(236, 256, size=3))
    shapes = []
    for (kind, color), (cx, cy, r) in zip(attrs, _place(rng, size, len(attrs))):
        angle = 0.0 if kind == "circle" else float(np.round(rng.uniform(-25.0, 25.0), 1))
        shapes.append(Shape(kind, color, cx, cy, r, angle))
    return Scene(size, background, tuple(shapes))


def free_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    return [(pick(rng, SHAPES), pick(rng, COLORS)) for _ in range(n)]


def distinct_shapes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    kinds = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    return [(k, pick(rng, COLORS)) for k in kinds]


def distinct_both(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    kinds = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    names = list(COLORS)
    return [(k, names[int(i)]) for k, i in zip(kinds, rng.choice(len(names), size=n, replace=False))]


def grounding_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Distinct labels; half the distractors share the shape or the colour of the first, so both matter."""
    attrs = [(pick(rng, SHAPES), pick(rng, COLORS))]
    while len(attrs) < n:
        kind, color = attrs[0]
        u = rng.random()
        if u < 0.25:
            cand = (kind, pick(rng, COLORS, exclude=(color,)))
        elif u < 0.5:
            cand = (pick(rng, SHAPES, exclude=(kind,)), color)
        else:
            cand = (pick(rng, SHAPES), pick(rng, COLORS))
        if cand not in attrs:
            attrs.append(cand)
    order = rng.permutation(n)
    return [attrs[int(i)] for i in order]


def caption(scene: Scene) -> str:
    """Objects named left to right: "a red circle and an orange star"."""
    parts = [_article(s.label) for s in sorted(scene.shapes, key=lambda s: (s.cx, s.cy))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption_key(scene: Scene) -> frozenset:
    return frozenset((s.color, s.kind) for s in scene.shapes)


def swap_colors(scene: Scene) -> Scene:
    """The same layout with the two objects' colours exchanged: a caption-level hard negative."""
    a, b = scene.shapes
    shapes = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    return dataclasses.replace(scene, shapes=shapes)
