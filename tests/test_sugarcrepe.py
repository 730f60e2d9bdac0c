"""SugarCrepe: exact scoring on a hand-made case, an end-to-end run on the tiny model, loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g2e_jax.eval.sugarcrepe import (
    QUERY_PREFIX,
    SUBSETS,
    SugarCrepeError,
    evaluate_sugarcrepe,
    load_sugarcrepe,
    make_synthetic_sugarcrepe,
    write_sugarcrepe_report,
)

E = np.eye(3, dtype=np.float32)
VECTORS = {
    # documents, keyed by image file name
    "a.png": E[0],
    "b.png": E[1],
    # queries, keyed by caption
    "cat": E[0],
    "dog": E[1],
    "bird": E[2],
    "tie+": np.array([0.6, 0.8, 0.0], np.float32),  # both score 0.6 against a.png: a tie
    "tie-": np.array([0.6, -0.8, 0.0], np.float32),
}


class FakeEmbedder:
    """Hand-chosen unit vectors; records every row so that encoding counts can be checked."""

    def __init__(self):
        self.rows = []

    def encode(self, texts, images=None, *, role="query", progress=None):
        images = [None] * len(texts) if images is None else list(images)
        out = []
        for text, image in zip(texts, images):
            self.rows.append((role, text, image))
            if role == "document":
                assert text == "<|image_1|>" and image is not None
                out.append(VECTORS[Path(image).name])
            else:
                assert role == "query" and image is None and text.startswith(QUERY_PREFIX)
                out.append(VECTORS[text[len(QUERY_PREFIX) :]])
        return np.stack(out)


def write_case(root: Path, subsets: dict) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"not decoded by the fake embedder")
    for name, items in subsets.items():
        entries = {
            str(i): {"filename": f, "caption": pos, "negative_caption": neg}
            for i, (f, pos, neg) in enumerate(items)
        }
        (root / f"{name}.json").write_text(json.dumps(entries))
    return root, images


def test_scoring_exact(tmp_path):
    data_dir, image_dir = write_case(
        tmp_path,
        {
            "replace_obj": [
                ("a.png", "cat", "dog"),
                ("b.png", "cat", "dog"),
                ("a.png", "tie+", "tie-"),
            ],  # 1/3
            "replace_att": [("a.png", "cat", "bird"), ("b.png", "dog", "cat")],  # 2/2
            "swap_att": [("b.png", "dog", "bird"), ("a.png", "bird", "cat")],  # 1/2
            "add_obj": [("b.png", "dog", "cat")],  # 1/1
        },
    )
    fake = FakeEmbedder()
    subsets = ["replace_obj", "replace_att", "swap_att", "add_obj"]
    results = evaluate_sugarcrepe(fake, data_dir, image_dir, subsets, progress=False)
    expected = {"replace_obj": (1 / 3, 3), "replace_att": (1.0, 2), "swap_att": (0.5, 2), "add_obj": (1.0, 1)}
    assert list(results["subsets"]) == subsets
    for name, (accuracy, n) in expected.items():
        assert results["subsets"][name] == {"accuracy": pytest.approx(accuracy), "n": n}
    assert results["average"] == pytest.approx((1 / 3 + 1.0 + 0.5 + 1.0) / 4)
    assert results["replace"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert results["swap"] == pytest.approx(0.5)
    assert results["add"] == pytest.approx(1.0)

    documents = [image for role, _, image in fake.rows if role == "document"]
    assert sorted(Path(p).name for p in documents) == ["a.png", "b.png"]  # once each, across subsets
    queries = [text for role, text, _ in fake.rows if role == "query"]
    assert len(queries) == 4 + 3 + 3 + 2  # distinct captions per subset

    json_path, md_path = write_sugarcrepe_report(results, tmp_path / "report")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    md = md_path.read_text()
    assert "| replace_obj | 3 | 33.33 |" in md and "| **replace** | 5 | 66.67 |" in md
    assert "| **average** | 8 | 70.83 |" in md


def test_end_to_end_tiny(tmp_path, tiny_dir):
    from g2e_jax import Embedder

    data_dir, image_dir = make_synthetic_sugarcrepe(tmp_path / "sc", seed=3, items_per_subset=4)
    again, _ = make_synthetic_sugarcrepe(tmp_path / "sc2", seed=3, items_per_subset=4)
    for name in SUBSETS:  # deterministic from the seed
        assert (data_dir / f"{name}.json").read_text() == (again / f"{name}.json").read_text()
    assert sorted(p.read_bytes() for p in image_dir.iterdir()) == sorted(
        p.read_bytes() for p in (again / "images").iterdir()
    )

    data = load_sugarcrepe(data_dir, image_dir)
    distinct_images = {item.image for items in data.values() for item in items}
    assert all(len(items) == 4 for items in data.values())
    for items in data.values():
        assert all(item.caption != item.negative_caption for item in items)

    embedder = Embedder.from_pretrained(tiny_dir, progress=False)
    rows = []
    encode = embedder.encode

    def counting(texts, images=None, **kw):
        rows.extend((kw["role"], t, im) for t, im in zip(texts, images or [None] * len(texts)))
        return encode(texts, images, **kw)

    embedder.encode = counting
    results = evaluate_sugarcrepe(embedder, data_dir, image_dir, progress=False)

    assert list(results["subsets"]) == list(SUBSETS)
    for r in results["subsets"].values():
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0
    for key in ("average", "replace", "swap", "add"):
        assert np.isfinite(results[key]) and 0.0 <= results[key] <= 1.0
    documents = [im for role, _, im in rows if role == "document"]
    assert len(documents) == len(set(documents)) == len(distinct_images)
    queries = [t for role, t, _ in rows if role == "query"]
    expected = sum(
        len({c for i in items for c in (i.caption, i.negative_caption)}) for items in data.values()
    )
    assert len(queries) == expected


def test_loader_errors(tmp_path):
    data_dir, image_dir = write_case(
        tmp_path, {"replace_obj": [("a.png", "cat", "dog")], "swap_obj": [("b.png", "dog", "cat")]}
    )
    with pytest.raises(SugarCrepeError, match="add_att.json: SugarCrepe subset file not found") as err:
        load_sugarcrepe(data_dir, image_dir, ["replace_obj", "add_att"])
    assert "replace_obj.json, swap_obj.json" in str(err.value)
    with pytest.raises(SugarCrepeError, match="none of the 7 subset files"):
        load_sugarcrepe(tmp_path / "images", image_dir, ["add_att"])
    with pytest.raises(ValueError, match="unknown SugarCrepe subset"):
        load_sugarcrepe(data_dir, image_dir, ["replace_object"])
    with pytest.raises(SugarCrepeError, match="image folder not found"):
        load_sugarcrepe(data_dir, tmp_path / "val2017", ["replace_obj"])

    (data_dir / "replace_att.json").write_text('{"0": {"filename": "a.png",')
    with pytest.raises(SugarCrepeError, match=r"replace_att.json: invalid JSON: .*line 1"):
        load_sugarcrepe(data_dir, image_dir, ["replace_att"])

    good = {"filename": "a.png", "caption": "cat", "negative_caption": "dog"}
    bad = {"filename": "b.png", "caption": "dog"}
    (data_dir / "replace_att.json").write_text(json.dumps({"17": good, "42": bad}))
    with pytest.raises(SugarCrepeError, match=r"replace_att.json: item '42': missing key 'negative_caption'"):
        load_sugarcrepe(data_dir, image_dir, "replace_att")

    (data_dir / "replace_att.json").write_text(json.dumps({"17": good, "43": {**good, "filename": "z.jpg"}}))
    with pytest.raises(SugarCrepeError, match=r"replace_att.json: item '43': image file not found: .*z.jpg"):
        load_sugarcrepe(data_dir, image_dir, "replace_att")
