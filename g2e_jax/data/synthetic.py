"""A tiny offline stand-in for MMEB: PIL-drawn shape scenes written in MMEB's train/eval formats.

The demo and the tests need MMEB-shaped data without a network or gigabytes of images, and they need
it reproducible: everything is drawn from ``numpy.random.default_rng`` streams keyed by the seed (one
stream per subset, so subsets do not shift each other), and PNGs are written with fixed options, so a
seed gives byte-identical files. Eight subsets cover MMEB's four categories, each with an IND and an
OOD member::

    output/images/<Subset>/*.png
    output/train/<Subset>/original.jsonl             qry, qry_image_path, pos_text, pos_image_path,
    output/train/<Subset>/diverse_instruction.jsonl      neg_text, neg_image_path
    output/eval/<Subset>/test.jsonl                  qry_text, qry_img_path, tgt_text[], tgt_img_path[]
    output/groups.json                               {"<Subset>": {"category": ..., "split": "IND"|"OOD"}}
    output/README.md

Image paths in rows are relative to ``output/images``; "" means no image. In eval rows candidate 0 is
the correct one. ``generate_synthetic`` returns the same files in memory together with the ground
truth of every image (the scene it shows), which the rows do not carry, so tests can check labels.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (130, 50, 180),
    "orange": (245, 125, 0),
    "pink": (240, 100, 180),
    "brown": (125, 75, 30),
}
COUNT_WORDS = ("one", "two", "three", "four")
CROP_SIZE = 56  # grounding crops; Qwen2-VL's minimum image area is 56 x 56
MIN_IMAGE_SIZE = 48

SUBSETS: dict[str, tuple[str, str]] = {
    "SynShape": ("Classification", "IND"),
    "SynColor": ("Classification", "OOD"),
    "SynColorVQA": ("VQA", "IND"),
    "SynCountVQA": ("VQA", "OOD"),
    "SynT2I": ("Retrieval", "IND"),
    "SynI2T": ("Retrieval", "OOD"),
    "SynGround": ("Grounding", "IND"),
    "SynGround-Matching": ("Grounding", "OOD"),
}

# Confusable labels, for hard negatives that are plausible rather than random.
_NEAR_COLORS = {
    "red": ("orange", "pink", "brown"),
    "orange": ("red", "yellow", "brown"),
    "yellow": ("orange", "green"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "pink"),
    "pink": ("purple", "red"),
    "brown": ("orange", "red"),
}
_NEAR_SHAPES = {
    "circle": ("square", "star"),
    "square": ("circle", "cross"),
    "triangle": ("star", "square"),
    "star": ("cross", "triangle"),
    "cross": ("star", "square"),
}

_IMAGE_DOC = "<|image_1|> Represent the given image."
_CROP_DOC = "<|image_1|> Represent the given cropped image of the object."

# Instruction templates per subset: index 0 is the MMEB wording, 1..3 the diverse_instruction paraphrases.
_CLS = (
    "<|image_1|> Represent the given image for classification",
    "<|image_1|> Encode this image so that its category can be identified",
    "<|image_1|> Produce a representation of the picture for assigning it a class label",
    "<|image_1|> Represent this image for the purpose of image classification",
)
_VQA = (
    "<|image_1|> Represent the given image with the following question: {question}",
    "<|image_1|> Encode the picture together with this question: {question}",
    "<|image_1|> Given the image, represent it along with the question below: {question}",
    "<|image_1|> Represent the image in light of the following question: {question}",
)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "SynShape": _CLS,
    "SynColor": _CLS,
    "SynColorVQA": _VQA,
    "SynCountVQA": _VQA,
    "SynT2I": (
        "Find me an everyday image that matches the given caption: {caption}",
        "Retrieve an everyday photo that fits this caption: {caption}",
        "Search for an ordinary image described by the caption: {caption}",
        "Locate an everyday picture matching the following description: {caption}",
    ),
    "SynI2T": (
        "<|image_1|> Find an image caption describing the given everyday image.",
        "<|image_1|> Retrieve a caption that describes this everyday image.",
        "<|image_1|> Find the text that best describes the given picture.",
        "<|image_1|> Look up a caption matching the everyday image shown.",
    ),
    "SynGround": (
        '<|image_1|> Select the portion of the image that isolates the object labeled as "{label}"',
        '<|image_1|> Pick the region of the image that contains only the object labeled "{label}"',
        '<|image_1|> Crop out the part of the image showing the object labeled as "{label}"',
        '<|image_1|> Identify the image region isolating the object called "{label}"',
    ),
    "SynGround-Matching": (
        "<|image_1|> Select the portion of the image that follows the language expressions.",
        "<|image_1|> Choose the expression that describes the object in this image region.",
        "<|image_1|> Find the language expression matching the object shown in the image.",
        "<|image_1|> Select the referring expression that this image portion follows.",
    ),
}

_DESCRIPTIONS = {
    "SynShape": "one shape on a plain background; the label is its shape name.",
    "SynColor": "one shape on a plain background; the label is its colour name.",
    "SynColorVQA": "1-3 shapes of different kinds; the question asks the colour of one of them.",
    "SynCountVQA": "1-4 shapes; the question asks how many there are (answers one..four).",
    "SynT2I": "a caption naming two coloured shapes retrieves the scene; hard negatives swap the colours.",
    "SynI2T": "a two-shape scene retrieves its caption; hard negatives swap the colours.",
    "SynGround": (
        "a 3-4 shape scene and an object label retrieve the 56x56 crop of that object; candidates are the "
        "scene's other objects first, then crops from other scenes."
    ),
    "SynGround-Matching": (
        "a 56x56 object crop retrieves its label; candidates are the labels of the scene's other objects, "
        "then other labels (texts only, so they are encoded with the query template)."
    ),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn object: ``r`` is the circumradius, ``angle`` a rotation in degrees."""

    kind: str
    color: str
    cx: int
    cy: int
    r: int
    angle: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a full image shows: its size, background RGB and objects (never overlapping)."""

    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class Crop:
    """What a grounding crop shows: ``scene.shapes[index]``, cut at ``box`` and resized to CROP_SIZE."""

    scene: Scene
    index: int
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return self.scene.shapes[self.index].label


@dataclasses.dataclass
class SyntheticData:
    """The dataset in memory: ``files`` (path under output -> bytes) and ``truth`` (image path -> content)."""

    files: dict[str, bytes]
    truth: dict[str, Scene | Crop]


# --- drawing --------------------------------------------------------------------------------------


def _polygon(s: Shape) -> list[tuple[float, float]]:
    if s.kind == "square":
        pts = [(s.r, math.radians(45 + 90 * k)) for k in range(4)]
    elif s.kind == "triangle":
        pts = [(s.r, math.radians(-90 + 120 * k)) for k in range(3)]
    elif s.kind == "star":
        pts = [(s.r if k % 2 == 0 else 0.45 * s.r, math.radians(-90 + 36 * k)) for k in range(10)]
    elif s.kind == "cross":
        a = s.r / math.hypot(1.0, 0.3)
        b = 0.3 * a
        local = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        local += [(-x, -y) for x, y in local]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in local]
    else:
        raise ValueError(f"no polygon for {s.kind!r}")
    t = math.radians(s.angle)
    return [(s.cx + rho * math.cos(phi + t), s.cy + rho * math.sin(phi + t)) for rho, phi in pts]


def render(scene: Scene) -> Image.Image:
    """Draws the scene without anti-aliasing, so every object pixel has exactly its palette colour."""
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
        else:
            draw.polygon(_polygon(s), fill=fill)
    return img


def crop_box(s: Shape, size: int) -> tuple[int, int, int, int]:
    """A square around the object with a margin, shifted (not cut) to stay inside the image."""
    half = round(1.25 * s.r) + 2
    side = min(2 * half, size)
    x0 = min(max(s.cx - half, 0), size - side)
    y0 = min(max(s.cy - half, 0), size - side)
    return (x0, y0, x0 + side, y0 + side)


def render_crop(crop: Crop) -> Image.Image:
    return render(crop.scene).crop(crop.box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)  # no metadata: bytes depend on pixels only
    return buf.getvalue()


# --- scenes ----------------------------------------------------------------------------------------


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


def _scene(rng: np.random.Generator, size: int, attrs: list[tuple[str, str]]) -> Scene:
    background = tuple(int(v) for v in rng.integers(236, 256, size=3))
    shapes = []
    for (kind, color), (cx, cy, r) in zip(attrs, _place(rng, size, len(attrs))):
        angle = 0.0 if kind == "circle" else float(np.round(rng.uniform(-25.0, 25.0), 1))
        shapes.append(Shape(kind, color, cx, cy, r, angle))
    return Scene(size, background, tuple(shapes))


def _pick(rng: np.random.Generator, options, exclude=()):
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _free_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    return [(_pick(rng, SHAPES), _pick(rng, COLORS)) for _ in range(n)]


def _distinct_shapes(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    kinds = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    return [(k, _pick(rng, COLORS)) for k in kinds]


def _distinct_both(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    kinds = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    names = list(COLORS)
    return [(k, names[int(i)]) for k, i in zip(kinds, rng.choice(len(names), size=n, replace=False))]


def _grounding_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Distinct labels; half the distractors share the shape or the colour of the first, so both matter."""
    attrs = [(_pick(rng, SHAPES), _pick(rng, COLORS))]
    while len(attrs) < n:
        kind, color = attrs[0]
        u = rng.random()
        if u < 0.25:
            cand = (kind, _pick(rng, COLORS, exclude=(color,)))
        elif u < 0.5:
            cand = (_pick(rng, SHAPES, exclude=(kind,)), color)
        else:
            cand = (_pick(rng, SHAPES), _pick(rng, COLORS))
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


def _caption_key(scene: Scene) -> frozenset:
    return frozenset((s.color, s.kind) for s in scene.shapes)


def _swap_colors(scene: Scene) -> Scene:
    """The same layout with the two objects' colours exchanged: a caption-level hard negative."""
    a, b = scene.shapes
    shapes = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    return dataclasses.replace(scene, shapes=shapes)


# --- subsets ---------------------------------------------------------------------------------------


class _Subset:
    """Collects one subset's images, truth and rows; train rows keep their template fields for paraphrasing."""

    def __init__(self, name: str, seed: int, size: int):
        self.name, self.size = name, size
        self.rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        self.images: dict[str, bytes] = {}
        self.truth: dict[str, Scene | Crop] = {}
        self.train: list[tuple[dict, dict]] = []  # (template fields, row without qry)
        self.eval: list[dict] = []

    def save_scene(self, stem: str, scene: Scene) -> str:
        path = f"{self.name}/{stem}.png"
        self.images[path], self.truth[path] = _png(render(scene)), scene
        return path

    def save_crop(self, stem: str, scene: Scene, index: int) -> str:
        crop = Crop(scene, index, crop_box(scene.shapes[index], scene.size))
        path = f"{self.name}/{stem}.png"
        self.images[path], self.truth[path] = _png(render_crop(crop)), crop
        return path

    def negative_rows(self, n: int) -> set[int]:
        return {int(i) for i in self.rng.permutation(n)[: n // 2]}

    def add_train(self, fields: dict, qry_image: str, pos_text: str, pos_image: str = "", neg=None):
        neg_text, neg_image = neg if neg is not None else ("", "")
        row = {
            "qry_image_path": qry_image,
            "pos_text": pos_text,
            "pos_image_path": pos_image,
            "neg_text": neg_text,
            "neg_image_path": neg_image,
        }
        self.train.append((fields, row))

    def add_eval(self, fields: dict, qry_image: str, tgt_text: list[str], tgt_img: list[str]):
        assert len(tgt_text) == len(tgt_img)
        self.eval.append(
            {
                "qry_text": TEMPLATES[self.name][0].format(**fields),
                "qry_img_path": qry_image,
                "tgt_text": tgt_text,
                "tgt_img_path": tgt_img,
            }
        )

    def text_candidates(self, correct: str, pool, n: int, first=()) -> list[str]:
        """``correct``, then ``first`` (hard ones, in order), then the rest of ``pool`` shuffled; n in all."""
        out = [correct]
        for c in first:
            if c not in out and len(out) < n:
                out.append(c)
        rest = [c for c in pool if c not in out]
        for i in self.rng.permutation(len(rest)):
            if len(out) >= n:
                break
            out.append(rest[int(i)])
        return out

    def files(self) -> dict[str, bytes]:
        templates = TEMPLATES[self.name]
        original, diverse = [], []
        for fields, row in self.train:
            original.append({"qry": templates[0].format(**fields), **row})
            choice = 1 + int(self.rng.integers(len(templates) - 1))
            diverse.append({"qry": templates[choice].format(**fields), **row})
        out = {f"images/{p}": b for p, b in self.images.items()}
        out[f"train/{self.name}/original.jsonl"] = _jsonl(original)
        out[f"train/{self.name}/diverse_instruction.jsonl"] = _jsonl(diverse)
        out[f"eval/{self.name}/test.jsonl"] = _jsonl(self.eval)
        return out


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _classification(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int, by: str):
    classes, near = (SHAPES, _NEAR_SHAPES) if by == "shape" else (tuple(COLORS), _NEAR_COLORS)
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            scene = _scene(rng, sub.size, _free_attrs(rng, 1))
            obj = scene.shapes[0]
            label = obj.kind if by == "shape" else obj.color
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            if split == "train":
                neg = (_pick(rng, near[label]), "") if i in negs else None
                sub.add_train({}, path, label, neg=neg)
            else:
                cands = sub.text_candidates(label, classes, min(num_candidates, len(classes)))
                sub.add_eval({}, path, cands, [""] * len(cands))


def _color_vqa(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng, classes = sub.rng, tuple(COLORS)
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            scene = _scene(rng, sub.size, _distinct_shapes(rng, int(rng.integers(1, 4))))
            target = scene.shapes[int(rng.integers(len(scene.shapes)))]
            fields = {"question": f"What color is the {target.kind}?"}
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            others = [s.color for s in scene.shapes if s.color != target.color]
            if split == "train":
                neg = None
                if i in negs:
                    neg = (others[0] if others else _pick(rng, _NEAR_COLORS[target.color]), "")
                sub.add_train(fields, path, target.color, neg=neg)
            else:
                n = min(num_candidates, len(classes))
                cands = sub.text_candidates(target.color, classes, n, first=others)
                sub.add_eval(fields, path, cands, [""] * len(cands))


def _count_vqa(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng = sub.rng
    fields = {"question": "How many shapes are in the image?"}
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            n = int(rng.integers(1, len(COUNT_WORDS) + 1))
            scene = _scene(rng, sub.size, _free_attrs(rng, n))
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            word = COUNT_WORDS[n - 1]
            if split == "train":
                near = [COUNT_WORDS[j] for j in (n - 2, n) if 0 <= j < len(COUNT_WORDS)]
                sub.add_train(fields, path, word, neg=(_pick(rng, near), "") if i in negs else None)
            else:
                cands = sub.text_candidates(word, COUNT_WORDS, min(num_candidates, len(COUNT_WORDS)))
                sub.add_eval(fields, path, cands, [""] * len(cands))


def _caption_pool(sub: _Subset, count: int) -> list[Scene]:
    """Two-object scenes with pairwise different captions, so any other scene is a wrong candidate."""
    scenes, keys = [], set()
    for _ in range(100 * count + 100):
        if len(scenes) == count:
            return scenes
        scene = _scene(sub.rng, sub.size, _distinct_both(sub.rng, 2))
        if _caption_key(scene) not in keys:
            keys.add(_caption_key(scene))
            scenes.append(scene)
    raise ValueError(f"{sub.name}: cannot draw {count} scenes with distinct captions; lower eval_queries")


def _retrieval(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int, t2i: bool):
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for i in range(train_rows):
        scene = _scene(rng, sub.size, _distinct_both(rng, 2))
        path = sub.save_scene(f"train_{i:05d}", scene)
        swapped = _swap_colors(scene)
        if t2i:
            neg = (_IMAGE_DOC, sub.save_scene(f"train_{i:05d}_neg", swapped)) if i in negs else None
            sub.add_train({"caption": caption(scene)}, "", _IMAGE_DOC, path, neg=neg)
        else:
            neg = (caption(swapped), "") if i in negs else None
            sub.add_train({}, path, caption(scene), neg=neg)
    pool = _caption_pool(sub, max(eval_queries, num_candidates))
    paths = [sub.save_scene(f"eval_{j:05d}", s) for j, s in enumerate(pool)]
    for i in range(eval_queries):
        others = [int(j) for j in rng.permutation(len(pool)) if j != i][: num_candidates - 1]
        order = [i, *others]
        if t2i:
            tgt_img = [paths[j] for j in order]
            sub.add_eval({"caption": caption(pool[i])}, "", [_IMAGE_DOC] * len(order), tgt_img)
        else:
            sub.add_eval({}, paths[i], [caption(pool[j]) for j in order], [""] * len(order))


def _ground_scene(sub: _Subset) -> Scene:
    rng = sub.rng
    return _scene(rng, sub.size, _grounding_attrs(rng, int(rng.integers(3, 5))))


def _grounding(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for i in range(train_rows):
        scene = _ground_scene(sub)
        t = int(rng.integers(len(scene.shapes)))
        path = sub.save_scene(f"train_{i:05d}", scene)
        pos = sub.save_crop(f"train_{i:05d}_obj{t}", scene, t)
        neg = None
        if i in negs:
            k = _pick(rng, [j for j in range(len(scene.shapes)) if j != t])
            neg = (_CROP_DOC, sub.save_crop(f"train_{i:05d}_obj{k}", scene, k))
        sub.add_train({"label": scene.shapes[t].label}, path, _CROP_DOC, pos, neg=neg)
    pool = [_ground_scene(sub) for _ in range(max(eval_queries, num_candidates))]
    crops = []  # per scene: [(path, label)] for every object
    for j, scene in enumerate(pool):
        crops.append(
            [(sub.save_crop(f"eval_{j:05d}_obj{k}", scene, k), s.label) for k, s in enumerate(scene.shapes)]
        )
    for i in range(eval_queries):
        scene = pool[i]
        path = sub.save_scene(f"eval_{i:05d}", scene)
        t = int(rng.integers(len(scene.shapes)))
        label = scene.shapes[t].label
        chosen = [crops[i][t][0]]
        chosen += [crops[i][int(k)][0] for k in rng.permutation(len(scene.shapes)) if k != t]
        chosen = chosen[:num_candidates]
        elsewhere = [p for j in range(len(pool)) if j != i for p, lab in crops[j] if lab != label]
        for k in rng.permutation(len(elsewhere)):
            if len(chosen) >= num_candidates:
                break
            chosen.append(elsewhere[int(k)])
        sub.add_eval({"label": label}, path, [_CROP_DOC] * len(chosen), chosen)


def _matching(sub: _Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng = sub.rng
    all_labels = [f"{c} {k}" for c in COLORS for k in SHAPES]
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            scene = _ground_scene(sub)
            t = int(rng.integers(len(scene.shapes)))
            path = sub.save_crop(f"{split}_{i:05d}", scene, t)
            label = scene.shapes[t].label
            others = [scene.shapes[int(k)].label for k in rng.permutation(len(scene.shapes)) if k != t]
            if split == "train":
                sub.add_train({}, path, label, neg=(others[0], "") if i in negs else None)
            else:
                n = min(num_candidates, len(all_labels))
                cands = sub.text_candidates(label, all_labels, n, first=others)
                sub.add_eval({}, path, cands, [""] * len(cands))


_BUILDERS = {
    "SynShape": lambda s, *a: _classification(s, *a, by="shape"),
    "SynColor": lambda s, *a: _classification(s, *a, by="color"),
    "SynColorVQA": _color_vqa,
    "SynCountVQA": _count_vqa,
    "SynT2I": lambda s, *a: _retrieval(s, *a, t2i=True),
    "SynI2T": lambda s, *a: _retrieval(s, *a, t2i=False),
    "SynGround": _grounding,
    "SynGround-Matching": _matching,
}


# --- entry points ----------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_synthetic(
    *,
    seed: int = 0,
    train_rows: int = 64,
    eval_queries: int = 24,
    num_candidates: int = 8,
    image_size: int = 84,
) -> SyntheticData:
    """Builds every file in memory (see the module docstring); ``make_synthetic`` writes them."""
    seed = _check_int("seed", seed, 0)
    args = (
        _check_int("train_rows", train_rows, 1),
        _check_int("eval_queries", eval_queries, 1),
        _check_int("num_candidates", num_candidates, 2),
    )
    size = _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    files: dict[str, bytes] = {}
    truth: dict[str, Scene | Crop] = {}
    counts = {}
    for name in SUBSETS:
        sub = _Subset(name, seed, size)
        _BUILDERS[name](sub, *args)
        files.update(sub.files())
        truth.update(sub.truth)
        counts[name] = (len(sub.train), len(sub.eval), len(sub.eval[0]["tgt_text"]), len(sub.images))
    groups = {name: {"category": cat, "split": split} for name, (cat, split) in SUBSETS.items()}
    files["groups.json"] = (json.dumps(groups, indent=2) + "\n").encode("utf-8")
    files["README.md"] = _readme(seed, size, counts, files).encode("utf-8")
    return SyntheticData(files=files, truth=truth)


def make_synthetic(
    output: str | Path,
    *,
    seed: int = 0,
    train_rows: int = 64,
    eval_queries: int = 24,
    num_candidates: int = 8,
    image_size: int = 84,
) -> Path:
    """Writes the synthetic MMEB-format dataset under ``output`` and returns its path.

    An existing synthetic dataset there (recognised by its groups.json) has its subset folders replaced, so
    no stale file survives; any other non-empty folder is refused rather than written into.
    """
    data = generate_synthetic(
        seed=seed,
        train_rows=train_rows,
        eval_queries=eval_queries,
        num_candidates=num_candidates,
        image_size=image_size,
    )
    out = Path(output)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not _is_synthetic(out):
                raise FileExistsError(f"{out}: not empty and not a synthetic dataset; choose another output")
            for name in SUBSETS:
                for part in ("images", "train", "eval"):
                    if (out / part / name).is_dir():
                        shutil.rmtree(out / part / name)
    for rel, content in sorted(data.files.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return out


def _is_synthetic(out: Path) -> bool:
    try:
        groups = json.loads((out / "groups.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(groups, dict) and set(groups) == set(SUBSETS)


def _readme(seed: int, size: int, counts: dict, files: dict[str, bytes]) -> str:
    total = sum(len(b) for b in files.values())
    lines = [
        "# Synthetic MMEB-format dataset",
        "",
        "Written by `g2e_jax.data.synthetic.make_synthetic` (offline, deterministic from the seed) as a small",
        "stand-in for MMEB: PIL-drawn shapes (" + ", ".join(SHAPES) + ") in " + ", ".join(COLORS) + ",",
        f"on plain light backgrounds. seed={seed}, image_size={size}, crops {CROP_SIZE}x{CROP_SIZE};",
        f"{total / 1e6:.2f} MB of images and rows (this README aside).",
        "",
        "Layout: `images/<Subset>/*.png`; `train/<Subset>/original.jsonl` and `diverse_instruction.jsonl`",
        "(MMEB-train rows: qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path; the",
        "diverse file paraphrases the query instruction); `eval/<Subset>/test.jsonl` (MMEB-eval rows:",
        "qry_text, qry_img_path, tgt_text, tgt_img_path; candidate 0 is the correct one); `groups.json`.",
        'Image paths are relative to `images/`; "" means no image. Half the train rows carry a hard negative.',
        "",
        "| Subset | Category | Split | Train rows | Eval queries | Candidates | Images | Task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (cat, split) in SUBSETS.items():
        n_train, n_eval, n_cand, n_img = counts[name]
        lines.append(
            f"| {name} | {cat} | {split} | {n_train} | {n_eval} | {n_cand} | {n_img} | {_DESCRIPTIONS[name]} |"
        )
    lines += ["", "Query instructions (MMEB wording):", ""]
    lines += [f"- {name}: `{TEMPLATES[name][0]}`" for name in SUBSETS]
    return "\n".join(lines) + "\n"
