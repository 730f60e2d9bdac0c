"""The eight subsets of the synthetic MMEB set: their instructions, and how each one's rows and images are drawn.

Each builder fills a ``Subset`` from its own random stream, in a fixed order of draws, so a seed gives
byte-identical files (keep that order when editing: the demo's published numbers are on these bytes).
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from g2e_jax.data.synthetic.scenes import (
    caption,
    caption_key,
    distinct_both,
    distinct_shapes,
    free_attrs,
    grounding_attrs,
    pick,
    random_scene,
    swap_colors,
)
from g2e_jax.data.synthetic.shapes import COLORS, SHAPES, Crop, Scene, crop_box, png, render, render_crop

COUNT_WORDS = ("one", "two", "three", "four")

# MMEB's four categories, each with an in-distribution and an out-of-distribution subset.
_CATEGORIES = {
    "Classification": ("SynShape", "SynColor"),
    "VQA": ("SynColorVQA", "SynCountVQA"),
    "Retrieval": ("SynT2I", "SynI2T"),
    "Grounding": ("SynGround", "SynGround-Matching"),
}
SUBSETS: dict[str, tuple[str, str]] = {
    name: (category, split)
    for category, names in _CATEGORIES.items()
    for name, split in zip(names, ("IND", "OOD"), strict=True)
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


class Subset:
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
        self.images[path], self.truth[path] = png(render(scene)), scene
        return path

    def save_crop(self, stem: str, scene: Scene, index: int) -> str:
        crop = Crop(scene, index, crop_box(scene.shapes[index], scene.size))
        path = f"{self.name}/{stem}.png"
        self.images[path], self.truth[path] = png(render_crop(crop)), crop
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


def _classification(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int, by: str):
    classes, near = (SHAPES, _NEAR_SHAPES) if by == "shape" else (tuple(COLORS), _NEAR_COLORS)
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            scene = random_scene(rng, sub.size, free_attrs(rng, 1))
            obj = scene.shapes[0]
            label = obj.kind if by == "shape" else obj.color
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            if split == "train":
                neg = (pick(rng, near[label]), "") if i in negs else None
                sub.add_train({}, path, label, neg=neg)
            else:
                cands = sub.text_candidates(label, classes, min(num_candidates, len(classes)))
                sub.add_eval({}, path, cands, [""] * len(cands))


def _color_vqa(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng, classes = sub.rng, tuple(COLORS)
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            scene = random_scene(rng, sub.size, distinct_shapes(rng, int(rng.integers(1, 4))))
            target = scene.shapes[int(rng.integers(len(scene.shapes)))]
            fields = {"question": f"What color is the {target.kind}?"}
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            others = [s.color for s in scene.shapes if s.color != target.color]
            if split == "train":
                neg = None
                if i in negs:
                    neg = (others[0] if others else pick(rng, _NEAR_COLORS[target.color]), "")
                sub.add_train(fields, path, target.color, neg=neg)
            else:
                n = min(num_candidates, len(classes))
                cands = sub.text_candidates(target.color, classes, n, first=others)
                sub.add_eval(fields, path, cands, [""] * len(cands))


def _count_vqa(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng = sub.rng
    fields = {"question": "How many shapes are in the image?"}
    negs = sub.negative_rows(train_rows)
    for split, count in (("train", train_rows), ("eval", eval_queries)):
        for i in range(count):
            n = int(rng.integers(1, len(COUNT_WORDS) + 1))
            scene = random_scene(rng, sub.size, free_attrs(rng, n))
            path = sub.save_scene(f"{split}_{i:05d}", scene)
            word = COUNT_WORDS[n - 1]
            if split == "train":
                near = [COUNT_WORDS[j] for j in (n - 2, n) if 0 <= j < len(COUNT_WORDS)]
                sub.add_train(fields, path, word, neg=(pick(rng, near), "") if i in negs else None)
            else:
                cands = sub.text_candidates(word, COUNT_WORDS, min(num_candidates, len(COUNT_WORDS)))
                sub.add_eval(fields, path, cands, [""] * len(cands))


def _caption_pool(sub: Subset, count: int) -> list[Scene]:
    """Two-object scenes with pairwise different captions, so any other scene is a wrong candidate."""
    scenes, keys = [], set()
    for _ in range(100 * count + 100):
        if len(scenes) == count:
            return scenes
        scene = random_scene(sub.rng, sub.size, distinct_both(sub.rng, 2))
        if caption_key(scene) not in keys:
            keys.add(caption_key(scene))
            scenes.append(scene)
    raise ValueError(f"{sub.name}: cannot draw {count} scenes with distinct captions; lower eval_queries")


def _retrieval(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int, t2i: bool):
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for i in range(train_rows):
        scene = random_scene(rng, sub.size, distinct_both(rng, 2))
        path = sub.save_scene(f"train_{i:05d}", scene)
        swapped = swap_colors(scene)
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


def _ground_scene(sub: Subset) -> Scene:
    rng = sub.rng
    return random_scene(rng, sub.size, grounding_attrs(rng, int(rng.integers(3, 5))))


def _grounding(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int):
    rng = sub.rng
    negs = sub.negative_rows(train_rows)
    for i in range(train_rows):
        scene = _ground_scene(sub)
        t = int(rng.integers(len(scene.shapes)))
        path = sub.save_scene(f"train_{i:05d}", scene)
        pos = sub.save_crop(f"train_{i:05d}_obj{t}", scene, t)
        neg = None
        if i in negs:
            k = pick(rng, [j for j in range(len(scene.shapes)) if j != t])
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


def _matching(sub: Subset, train_rows: int, eval_queries: int, num_candidates: int):
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


BUILDERS = {
    "SynShape": lambda s, *a: _classification(s, *a, by="shape"),
    "SynColor": lambda s, *a: _classification(s, *a, by="color"),
    "SynColorVQA": _color_vqa,
    "SynCountVQA": _count_vqa,
    "SynT2I": lambda s, *a: _retrieval(s, *a, t2i=True),
    "SynI2T": lambda s, *a: _retrieval(s, *a, t2i=False),
    "SynGround": _grounding,
    "SynGround-Matching": _matching,
}
