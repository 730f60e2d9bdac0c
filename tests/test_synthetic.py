"""The synthetic MMEB stand-in: deterministic bytes, MMEB schemas, and labels that match what is drawn.

Labels are checked against the generator's ground truth (``generate_synthetic().truth``) and, where the
pixels allow it, against the pixels alone (colours present, connected components), so a bookkeeping bug
in the generator cannot hide behind its own metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g2e_jax.data import synthetic as syn

TRAIN_KEYS = ["qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"]
EVAL_KEYS = ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
MARKER = "<|image_1|>"
DEFAULTS = {"train_rows": 64, "eval_queries": 24, "num_candidates": 8}
EXPECTED_CANDIDATES = {"SynShape": 5, "SynCountVQA": 4}  # capped at the number of classes; others 8


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return syn.make_synthetic(tmp_path_factory.mktemp("syn") / "data", seed=0)


@pytest.fixture(scope="module")
def data() -> syn.SyntheticData:
    return syn.generate_synthetic(seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _pixels(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / "images" / rel) as img:
        return np.asarray(img.convert("RGB"))


def _colors_present(pixels: np.ndarray, background) -> set[tuple[int, int, int]]:
    flat = pixels.reshape(-1, 3)
    flat = flat[(flat != np.asarray(background)).any(-1)]
    return {tuple(int(v) for v in c) for c in np.unique(flat, axis=0)}


def _components(mask: np.ndarray) -> int:
    """8-connected components of a boolean mask, by min-label propagation (no scipy needed)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        new = lab
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                new = np.minimum(new, pad[dy : dy + h, dx : dx + w])
        new = np.where(mask, new, big)
        if (new == lab).all():
            return len(np.unique(lab[mask]))
        lab = new


def _parse_objects(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"\ban? (\w+) (\w+)", text))


# --- files ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(root, data, tmp_path):
    again = _files(syn.make_synthetic(tmp_path / "again", seed=0))
    first = _files(root)
    assert sorted(first) == sorted(again)
    assert all(first[k] == again[k] for k in first), [k for k in first if first[k] != again[k]][:5]
    assert first == data.files  # what generate_synthetic returns (and its truth describes) is what is written


def test_different_seed_differs(data):
    other = syn.generate_synthetic(seed=1).files
    pngs = [k for k in other if k.endswith(".png") and k in data.files]
    assert len(pngs) > 0.8 * len(data.files)  # mostly the same names (negatives and crops vary)
    assert sum(other[k] != data.files[k] for k in pngs) > 0.9 * len(pngs)
    jsonls = [k for k in other if k.endswith(".jsonl")]
    assert all(other[k] != data.files[k] for k in jsonls)


def test_layout_and_groups(root):
    groups = json.loads((root / "groups.json").read_text())
    assert groups == {name: {"category": c, "split": s} for name, (c, s) in syn.SUBSETS.items()}
    assert {c for c, _ in syn.SUBSETS.values()} == {"Classification", "VQA", "Retrieval", "Grounding"}
    for name in syn.SUBSETS:
        for rel in ("train/{}/original.jsonl", "train/{}/diverse_instruction.jsonl", "eval/{}/test.jsonl"):
            assert (root / rel.format(name)).is_file()
        assert (root / "images" / name).is_dir()
    readme = (root / "README.md").read_text()
    assert all(name in readme for name in syn.SUBSETS)


def test_total_size_is_small(root):
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024


def test_every_referenced_image_exists_and_opens(root):
    referenced = set()
    for name in syn.SUBSETS:
        for rel in ("train/{}/original.jsonl", "train/{}/diverse_instruction.jsonl"):
            for r in _rows(root / rel.format(name)):
                referenced |= {r["qry_image_path"], r["pos_image_path"], r["neg_image_path"]}
        for r in _rows(root / f"eval/{name}/test.jsonl"):
            referenced |= {r["qry_img_path"], *r["tgt_img_path"]}
    referenced.discard("")
    for rel in sorted(referenced):
        assert not Path(rel).is_absolute() and rel.split("/")[0] in syn.SUBSETS, rel
        with Image.open(root / "images" / rel) as img:
            img.load()
            assert img.format == "PNG" and img.mode == "RGB"
            crop = "_obj" in rel or rel.startswith("SynGround-Matching/")
            assert img.size == ((syn.CROP_SIZE,) * 2 if crop else (84, 84)), rel


# --- schemas ---------------------------------------------------------------------------------------------------


def _marker_matches(text: str, image: str) -> bool:
    return (MARKER in text) == (image != "")


@pytest.mark.parametrize("name", list(syn.SUBSETS))
def test_train_rows_schema(root, name):
    original = _rows(root / f"train/{name}/original.jsonl")
    diverse = _rows(root / f"train/{name}/diverse_instruction.jsonl")
    assert len(original) == len(diverse) == DEFAULTS["train_rows"]
    for row in original + diverse:
        assert list(row) == TRAIN_KEYS and all(isinstance(v, str) for v in row.values())
        assert row["qry"] and row["pos_text"] and (row["qry_image_path"] or MARKER not in row["qry"])
        assert _marker_matches(row["qry"], row["qry_image_path"])
        assert _marker_matches(row["pos_text"], row["pos_image_path"])
        if row["neg_text"] or row["neg_image_path"]:
            assert _marker_matches(row["neg_text"], row["neg_image_path"])
            assert (row["neg_text"], row["neg_image_path"]) != (row["pos_text"], row["pos_image_path"])
    assert sum(bool(r["neg_text"]) for r in original) == DEFAULTS["train_rows"] // 2
    paraphrases = syn.TEMPLATES[name][1:]
    prefixes = [t.split("{")[0] for t in paraphrases]
    for o, d in zip(original, diverse):
        assert {k: v for k, v in o.items() if k != "qry"} == {k: v for k, v in d.items() if k != "qry"}
        assert d["qry"] != o["qry"] and any(d["qry"].startswith(p) for p in prefixes)
    assert len({d["qry"].split(":")[0] for d in diverse}) > 1  # the paraphrases actually vary
    assert len({r["pos_text"] for r in original}) < len(original) or name in ("SynI2T", "SynGround-Matching")


@pytest.mark.parametrize("name", list(syn.SUBSETS))
def test_eval_rows_schema(root, name):
    rows = _rows(root / f"eval/{name}/test.jsonl")
    assert len(rows) == DEFAULTS["eval_queries"]
    n = EXPECTED_CANDIDATES.get(name, DEFAULTS["num_candidates"])
    for row in rows:
        assert list(row) == EVAL_KEYS
        assert isinstance(row["qry_text"], str) and isinstance(row["qry_img_path"], str)
        assert _marker_matches(row["qry_text"], row["qry_img_path"])
        texts, images = row["tgt_text"], row["tgt_img_path"]
        assert len(texts) == len(images) == n
        assert all(isinstance(t, str) for t in texts + images)
        assert all(_marker_matches(t, i) for t, i in zip(texts, images))
        assert len(set(zip(texts, images))) == n  # distinct candidates
        if any(images):
            assert all(images) and len(set(images)) == n
        else:
            assert len(set(texts)) == n


def test_datasets_reads_every_jsonl(root, tmp_path):
    import datasets  # a dependency of the package (setup.py): missing, this fails rather than skips
    datasets.disable_progress_bars()

    def split(name, kind):
        return re.sub(r"\W", "_", f"{name}_{kind}")

    train = {
        split(n, k): str(root / f"train/{n}/{k}.jsonl")
        for n in syn.SUBSETS
        for k in ("original", "diverse_instruction")
    }
    evals = {split(n, "test"): str(root / f"eval/{n}/test.jsonl") for n in syn.SUBSETS}
    for files, keys, rows in ((train, TRAIN_KEYS, 64), (evals, EVAL_KEYS, 24)):
        loaded = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "hf"))
        for s in files:
            assert loaded[s].column_names == keys and loaded[s].num_rows == rows
    row = loaded[split("SynT2I", "test")][0]
    assert isinstance(row["tgt_img_path"], list) and len(row["tgt_img_path"]) == 8


# --- ground truth ----------------------------------------------------------------------------------------------


def test_images_match_their_truth(root, data):
    for rel, truth in data.truth.items():
        pixels = _pixels(root, rel)
        if isinstance(truth, syn.Scene):
            assert np.array_equal(pixels, np.asarray(syn.render(truth))), rel
            assert _colors_present(pixels, truth.background) == {syn.COLORS[s.color] for s in truth.shapes}, (
                rel
            )
            assert _components(~(pixels == truth.background).all(-1)) == len(truth.shapes), rel
        else:
            assert np.array_equal(pixels, np.asarray(syn.render_crop(truth))), rel
            obj, (x0, y0, x1, _) = truth.scene.shapes[truth.index], truth.box
            scale = syn.CROP_SIZE / (x1 - x0)
            cy, cx = (int((v + 0.5) * scale) for v in (obj.cy - y0, obj.cx - x0))
            assert np.abs(pixels[cy, cx].astype(int) - syn.COLORS[obj.color]).max() <= 2, rel


def _label(name: str, truth, question: str = "") -> str:
    """The correct answer, recomputed from what the image shows."""
    if name == "SynShape":
        (s,) = truth.shapes
        return s.kind
    if name == "SynColor":
        (s,) = truth.shapes
        return s.color
    if name == "SynColorVQA":
        kind = re.search(r"What color is the (\w+)\?", question).group(1)
        (s,) = [s for s in truth.shapes if s.kind == kind]
        return s.color
    if name == "SynCountVQA":
        assert question.endswith("How many shapes are in the image?")
        return syn.COUNT_WORDS[len(truth.shapes) - 1]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["SynShape", "SynColor", "SynColorVQA", "SynCountVQA"])
def test_text_labels_are_correct(root, data, name):
    for row in _rows(root / f"train/{name}/original.jsonl"):
        label = _label(name, data.truth[row["qry_image_path"]], row["qry"])
        assert row["pos_text"] == label and row["neg_text"] != label
    for row in _rows(root / f"eval/{name}/test.jsonl"):
        truth = data.truth[row["qry_img_path"]]
        assert row["tgt_text"][0] == _label(name, truth, row["qry_text"])
        pixels = _pixels(root, row["qry_img_path"])
        if name == "SynColor":  # from the pixels alone: the only non-background colour
            assert _colors_present(pixels, truth.background) == {syn.COLORS[row["tgt_text"][0]]}
        if name == "SynCountVQA":  # from the pixels alone: separate blobs
            count = _components(~(pixels == truth.background).all(-1))
            assert row["tgt_text"][0] == syn.COUNT_WORDS[count - 1]


def test_retrieval_captions_are_correct(root, data):
    def objects(rel):
        return {(s.color, s.kind) for s in data.truth[rel].shapes}

    for row in _rows(root / "train/SynT2I/original.jsonl"):
        caption = row["qry"].split(": ", 1)[1]
        assert _parse_objects(caption) == objects(row["pos_image_path"])
        if row["neg_image_path"]:
            assert objects(row["neg_image_path"]) != objects(row["pos_image_path"])
    for row in _rows(root / "eval/SynT2I/test.jsonl"):
        wanted = _parse_objects(row["qry_text"].split(": ", 1)[1])
        assert [objects(p) == wanted for p in row["tgt_img_path"]] == [True] + [False] * 7
    for row in _rows(root / "train/SynI2T/original.jsonl"):
        assert _parse_objects(row["pos_text"]) == objects(row["qry_image_path"])
        assert row["neg_text"] == "" or _parse_objects(row["neg_text"]) != objects(row["qry_image_path"])
    for row in _rows(root / "eval/SynI2T/test.jsonl"):
        got = [_parse_objects(t) == objects(row["qry_img_path"]) for t in row["tgt_text"]]
        assert got == [True] + [False] * 7
        assert row["tgt_text"][0] == syn.caption(data.truth[row["qry_img_path"]])


def test_grounding_crops_are_correct(root, data):
    for row in _rows(root / "train/SynGround/original.jsonl"):
        label = re.search(r'"(.+)"', row["qry"]).group(1)
        pos = data.truth[row["pos_image_path"]]
        assert pos.label == label and pos.scene == data.truth[row["qry_image_path"]]
        if row["neg_image_path"]:
            neg = data.truth[row["neg_image_path"]]
            assert neg.scene == pos.scene and neg.label != label
    for row in _rows(root / "eval/SynGround/test.jsonl"):
        label = re.search(r'"(.+)"', row["qry_text"]).group(1)
        scene = data.truth[row["qry_img_path"]]
        crops = [data.truth[p] for p in row["tgt_img_path"]]
        assert crops[0].label == label and [c.label for c in crops[1:]].count(label) == 0
        same = [c.scene == scene for c in crops]
        assert same == [True] * len(scene.shapes) + [False] * (len(crops) - len(scene.shapes))
    for row in _rows(root / "train/SynGround-Matching/original.jsonl"):
        crop = data.truth[row["qry_image_path"]]
        assert row["pos_text"] == crop.label
        if row["neg_text"]:
            assert row["neg_text"] in {s.label for s in crop.scene.shapes} - {crop.label}
    for row in _rows(root / "eval/SynGround-Matching/test.jsonl"):
        crop = data.truth[row["qry_img_path"]]
        assert row["tgt_text"][0] == crop.label and crop.label not in row["tgt_text"][1:]
        others = {s.label for s in crop.scene.shapes} - {crop.label}
        assert set(row["tgt_text"][1 : 1 + len(others)]) == others  # the scene's other objects come first


# --- parameters ---------------------------------------------------------------------------------------------


def test_small_and_capped_parameters(tmp_path):
    out = syn.make_synthetic(
        tmp_path / "d", seed=3, train_rows=2, eval_queries=1, num_candidates=50, image_size=56
    )
    caps = {"SynShape": 5, "SynColor": 8, "SynColorVQA": 8, "SynCountVQA": 4, "SynGround-Matching": 40}
    for name in syn.SUBSETS:
        (row,) = _rows(out / f"eval/{name}/test.jsonl")
        assert len(row["tgt_text"]) == caps.get(name, 50)
        assert len(set(zip(row["tgt_text"], row["tgt_img_path"]))) == len(row["tgt_text"])
        assert len(_rows(out / f"train/{name}/original.jsonl")) == 2
    with Image.open(out / "images/SynShape/train_00000.png") as img:
        assert img.size == (56, 56)


def test_rewrite_replaces_and_refuses_foreign_folders(tmp_path):
    out = syn.make_synthetic(tmp_path / "d", train_rows=4, eval_queries=2)
    assert (out / "images/SynShape/train_00003.png").exists()
    syn.make_synthetic(out, train_rows=2, eval_queries=2)
    assert not (out / "images/SynShape/train_00003.png").exists()  # no stale files
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        syn.make_synthetic(foreign)
    assert (foreign / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    "kwargs",
    [{"num_candidates": 1}, {"train_rows": 0}, {"eval_queries": 0}, {"image_size": 32}, {"seed": -1}],
)
def test_bad_arguments(kwargs, tmp_path):
    with pytest.raises(ValueError):
        syn.make_synthetic(tmp_path / "d", **kwargs)
