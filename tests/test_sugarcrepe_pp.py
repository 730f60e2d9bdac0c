"""SugarCrepe++: scoring against an independent numpy computation, the synthetic set, the official
pipeline (transformers + the official template strings) on the tiny model, loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g2e_jax.eval.sugarcrepe import (
    PP_SUBSETS,
    SugarCrepeError,
    evaluate_sugarcrepe_pp,
    load_sugarcrepe_pp,
    make_synthetic_sugarcrepe_pp,
)

PREFIX = "Find me an image that matches the given caption: "  # the official script's, typed out
SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."


class KeyedEmbedder:
    """Each row's vector comes from ``vectors[key]`` (key: the image file name or the caption text),
    so the test knows every embedding without running the code under test."""

    def __init__(self, vectors):
        self.vectors, self.rows = vectors, []

    def encode(self, texts, images=None, *, role="query", progress=None):
        images = [None] * len(texts) if images is None else list(images)
        out = []
        for text, image in zip(texts, images):
            self.rows.append((role, text, image))
            if role == "document":
                assert text == "<|image_1|>" and image is not None
                out.append(self.vectors[Path(image).name])
            else:
                assert image is None and text.startswith(PREFIX)
                out.append(self.vectors[text[len(PREFIX) :]])
        return np.stack(out)


def write_pp(root: Path, subsets: dict, images=("a.png", "b.png", "c.png"), as_dict=()) -> tuple[Path, Path]:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in images:
        (image_dir / name).write_bytes(b"not decoded by the fake embedder")
    for name, items in subsets.items():
        entries = [
            {"caption": c1, "caption2": c2, "negative_caption": n, "filename": f} for f, c1, c2, n in items
        ]
        data = {str(10 + i): e for i, e in enumerate(entries)} if name in as_dict else entries
        (root / f"{name}.json").write_text(json.dumps(data))
    return root, image_dir


def reference(vectors, items) -> tuple[float, float]:
    """The official rule, item by item, in plain numpy."""
    i2t = text = 0
    for f, c1, c2, n in items:
        img, p1, p2, neg = (np.asarray(vectors[k], np.float64) for k in (f, c1, c2, n))
        i2t += bool(img @ p1 > img @ neg and img @ p2 > img @ neg)
        text += bool(p1 @ p2 > p1 @ neg and p1 @ p2 > p2 @ neg)
    return 100 * i2t / len(items), 100 * text / len(items)


def test_scoring_matches_an_independent_computation(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(12)]
    vectors = {
        k: v / np.linalg.norm(v)
        for k, v in zip(["a.png", "b.png", "c.png"] + words, rng.normal(size=(15, 6)).astype(np.float32))
    }
    # Hand-made edge cases: exact ties count as wrong in both tasks.
    e = np.eye(6, dtype=np.float32)
    half = (e[0] + e[1]) / np.sqrt(2)
    vectors.update({"same": e[0], "same2": e[0], "tie": e[0], "far": e[1], "half": half, "half2": half})
    subsets = {
        "swap_obj": [tuple(rng.choice(words, 3, replace=False)) for _ in range(9)],
        "replace_rel": [tuple(rng.choice(words, 3, replace=False)) for _ in range(7)],
        "swap_att": [("same", "same2", "tie"), ("same", "same2", "far"), ("half2", "same", "half")],
    }
    subsets = {
        name: [
            (("img0.png" if name == "swap_att" else ["a.png", "b.png", "c.png"][i % 3]),) + tuple(c)
            for i, c in enumerate(items)
        ]
        for name, items in subsets.items()
    }
    vectors["img0.png"] = e[0]
    data_dir, image_dir = write_pp(
        tmp_path, subsets, images=("a.png", "b.png", "c.png", "img0.png"), as_dict=("replace_rel",)
    )
    fake = KeyedEmbedder(vectors)
    results = evaluate_sugarcrepe_pp(
        fake, data_dir, image_dir, ["swap_obj", "replace_rel", "swap_att"], progress=False
    )
    assert list(results) == ["swap_obj", "replace_rel", "swap_att"]
    for name, items in subsets.items():
        i2t, text = reference(vectors, items)
        assert results[name] == {
            "image_to_text": pytest.approx(i2t),
            "text_only": pytest.approx(text),
            "total": len(items),
        }
    # the edge cases: (tie) image ties the negative and c1.c2 ties c1.neg -> wrong; (far) both right;
    # (half) only caption 1 ties the negative for the image -> wrong
    assert results["swap_att"] == {
        "image_to_text": pytest.approx(100 / 3),
        "text_only": pytest.approx(100 / 3),
        "total": 3,
    }
    assert 0 < results["swap_obj"]["image_to_text"] < 100 and 0 < results["swap_obj"]["text_only"] < 100

    documents = [Path(im).name for role, _, im in fake.rows if role == "document"]
    assert sorted(documents) == ["a.png", "b.png", "c.png", "img0.png"]  # each image once, across subsets
    queries = [t for role, t, _ in fake.rows if role == "query"]
    distinct = sum(len({c for item in items for c in item[1:]}) for items in subsets.values())
    assert len(queries) == distinct


def test_synthetic_set_is_deterministic_and_well_formed(tmp_path):
    data_dir, image_dir = make_synthetic_sugarcrepe_pp(tmp_path / "a", seed=5, items_per_subset=4)
    again, _ = make_synthetic_sugarcrepe_pp(tmp_path / "b", seed=5, items_per_subset=4)
    for name in PP_SUBSETS:
        text = (data_dir / f"{name}.json").read_text()
        assert text == (again / f"{name}.json").read_text()
        items = json.loads(text)
        assert isinstance(items, list) and len(items) == 4  # the official files are lists
        for item in items:
            assert set(item) == {"caption", "caption2", "negative_caption", "filename"}
            assert len({item["caption"], item["caption2"], item["negative_caption"]}) == 3
            # the paraphrase names the same two objects, the negative is another scene
            assert sorted(item["caption"].split()) != sorted(
                item["negative_caption"].split()
            ) or name.startswith("swap")
    data = load_sugarcrepe_pp(data_dir, image_dir)
    assert list(data) == list(PP_SUBSETS)
    assert all(item.image.is_file() for items in data.values() for item in items)


@pytest.mark.slow
def test_matches_the_official_pipeline_on_the_tiny_model(tmp_path, tiny_dir):
    """Our evaluation against the official computation: the template strings typed out, encoded by
    transformers through the HF processor, scored item by item in numpy."""
    pytest.importorskip("torch")
    from hf_reference import load_hf_model, official_embeddings, official_template

    from g2e_jax import Embedder
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    data_dir, image_dir = make_synthetic_sugarcrepe_pp(tmp_path / "pp", seed=1, items_per_subset=4)
    embedder = Embedder.from_pretrained(tiny_dir, dtype="float32", progress=False)
    results = evaluate_sugarcrepe_pp(embedder, data_dir, image_dir, progress=False)

    from PIL import Image

    hf_model, processor = load_hf_model(tiny_dir), load_hf_processor(tiny_dir)
    all_items = {name: json.loads((data_dir / f"{name}.json").read_text()) for name in PP_SUBSETS}
    captions = sorted(
        {
            i[k]
            for items in all_items.values()
            for i in items
            for k in ("caption", "caption2", "negative_caption")
        }
    )
    files = sorted({i["filename"] for items in all_items.values() for i in items})
    query = [
        official_template(PREFIX + c, has_image=False, role="query", system=SYSTEM, scheme="gen2embed")
        for c in captions
    ]
    document = official_template(
        "<|image_pad|>", has_image=True, role="document", system=SYSTEM, scheme="gen2embed"
    )
    images = [Image.open(image_dir / f).convert("RGB") for f in files]
    vectors = dict(
        zip(
            captions, official_embeddings(hf_model, processor, query, [None] * len(query), scheme="gen2embed")
        )
    )
    vectors.update(
        zip(
            files,
            official_embeddings(hf_model, processor, [document] * len(files), images, scheme="gen2embed"),
        )
    )
    margins = []
    for name, raw in all_items.items():
        items = [(i["filename"], i["caption"], i["caption2"], i["negative_caption"]) for i in raw]
        i2t, text = reference(vectors, items)
        assert results[name]["image_to_text"] == pytest.approx(i2t)
        assert results[name]["text_only"] == pytest.approx(text)
        assert results[name]["total"] == 4
        for f, c1, c2, n in items:
            v = {k: vectors[k] for k in (f, c1, c2, n)}
            margins += [
                v[f] @ v[c1] - v[f] @ v[n],
                v[f] @ v[c2] - v[f] @ v[n],
                v[c1] @ v[c2] - v[c1] @ v[n],
                v[c1] @ v[c2] - v[c2] @ v[n],
            ]
    # The embeddings agree to ~1e-7 (cosine), so no decision above is float noise: each margin is larger.
    assert min(abs(m) for m in margins) > 1e-6


def test_loader_errors(tmp_path):
    data_dir, image_dir = write_pp(tmp_path, {"swap_obj": [("a.png", "x", "y", "z")]})
    with pytest.raises(SugarCrepeError, match=r"replace_rel.json: SugarCrepe\+\+ subset file not found"):
        load_sugarcrepe_pp(data_dir, image_dir, ["swap_obj", "replace_rel"])
    with pytest.raises(ValueError, match=r"unknown SugarCrepe\+\+ subset.*add_obj"):
        load_sugarcrepe_pp(data_dir, image_dir, ["add_obj"])  # a SugarCrepe subset, not a ++ one
    (data_dir / "swap_att.json").write_text(
        json.dumps([{"caption": "x", "negative_caption": "z", "filename": "a.png"}])
    )
    with pytest.raises(SugarCrepeError, match=r"swap_att.json: item '0': missing key 'caption2'"):
        load_sugarcrepe_pp(data_dir, image_dir, "swap_att")
    (data_dir / "swap_att.json").write_text(json.dumps("not items"))
    with pytest.raises(SugarCrepeError, match=r"swap_att.json: expected a JSON list of items"):
        load_sugarcrepe_pp(data_dir, image_dir, "swap_att")
    (data_dir / "swap_att.json").write_text(
        json.dumps([{"caption": "x", "caption2": "y", "negative_caption": "z", "filename": "nope.jpg"}])
    )
    with pytest.raises(SugarCrepeError, match=r"swap_att.json: item '0': image file not found: .*nope.jpg"):
        load_sugarcrepe_pp(data_dir, image_dir, "swap_att")
