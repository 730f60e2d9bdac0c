"""MMEB readers, Precision@1 scoring and averaging (checked by hand), report and candidate cache."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from g2e_jax.data.mmeb import DataError, read_eval, read_train
from g2e_jax.eval.mmeb import evaluate_mmeb, markdown_table, summarize, write_report


class FakeEmbedder:
    """Embeds each text to a fixed unit vector, so every score is known by hand."""

    model_path = None

    def __init__(self, vectors):
        self.vectors = {k: np.asarray(v, np.float32) / np.linalg.norm(v) for k, v in vectors.items()}
        self.calls = []

    def encode(self, texts, images=None, *, role="query", subset=None, progress=None):
        self.calls.append((role, subset, len(texts)))
        return np.stack([self.vectors[t] for t in texts])


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_row(q, cands):
    return {"qry_text": q, "qry_img_path": "", "tgt_text": cands, "tgt_img_path": [""] * len(cands)}


@pytest.fixture
def hand_made(tmp_path):
    root = tmp_path / "eval"
    # Classification subset A (IND): queries q1..q4; q1, q2 correct, q3 wrong, q4 correct -> 3/4.
    _write_jsonl(root / "A" / "test.jsonl", [
        _eval_row("q1", ["cat", "dog"]), _eval_row("q2", ["dog", "cat"]),
        _eval_row("q3", ["cat", "dog"]), _eval_row("q4", ["bird", "cat", "dog"]),
    ])  # fmt: skip
    # Classification subset B (OOD): 1 of 2 correct -> 1/2.
    _write_jsonl(
        root / "B" / "test.jsonl", [_eval_row("q1", ["cat", "bird"]), _eval_row("q2", ["bird", "dog"])]
    )
    # Retrieval subset C (IND): 2 of 2 -> 1.
    _write_jsonl(
        root / "C" / "test.jsonl", [_eval_row("q5", ["car", "cat"]), _eval_row("q6", ["bus", "car"])]
    )
    vectors = {
        "q1": [1, 0, 0, 0], "q2": [0, 1, 0, 0], "q3": [0, 1, 0, 0], "q4": [0, 0, 1, 0], "q5": [0, 0, 0, 1],
        "q6": [0, 0.2, 0, 1], "cat": [1, 0.1, 0, 0], "dog": [0, 1, 0, 0], "bird": [0, 0, 1, 0],
        "car": [0, 0, 0.1, 1], "bus": [0, 1, 0, 0.5],
    }  # fmt: skip
    groups = {"A": ("Classification", "IND"), "B": ("Classification", "OOD"), "C": ("Retrieval", "IND")}
    return root, FakeEmbedder(vectors), groups


def test_scores_and_averages_match_hand_computation(hand_made, tmp_path):
    root, embedder, groups = hand_made
    results = evaluate_mmeb(embedder, root, ["A", "B", "C"], groups=groups, progress=False)
    subsets = results["subsets"]
    # C: q5 picks car (correct); q6 scores bus 0.63 < car 1.0 (before q6's norm), picks index 1: wrong.
    assert subsets["A"]["precision_at_1"] == pytest.approx(3 / 4)
    assert subsets["B"]["precision_at_1"] == pytest.approx(1 / 2)
    assert subsets["C"]["precision_at_1"] == pytest.approx(1 / 2)
    summary = results["summary"]
    assert summary["categories"]["Classification"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert summary["categories"]["Retrieval"] == pytest.approx(1 / 2)
    assert summary["IND"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert summary["OOD"] == pytest.approx(1 / 2)
    assert summary["overall"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    # Candidates are deduplicated per subset: A has cat, dog, bird -> one encode of 3 documents.
    assert ("document", "A", 3) in embedder.calls and ("query", None, 4) in embedder.calls
    paths = write_report({"hierarchical": results, "plain": results}, tmp_path / "report")
    table = paths["markdown"].read_text()
    assert "| A | Classification | IND | 75.0 | 75.0 |" in table
    assert "| overall | 58.3 | 58.3 |" in table
    assert paths["plot"].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["plain"]["summary"]["overall"] == pytest.approx(7 / 12)


def test_summary_rejects_unknown_subsets():
    with pytest.raises(ValueError, match="without a category"):
        summarize({"X": 1.0}, {"A": ("VQA", "IND")})


def test_markdown_marks_absent_categories(hand_made):
    root, embedder, groups = hand_made
    results = evaluate_mmeb(embedder, root, ["A"], groups=groups, progress=False)
    table = markdown_table({"run": results})
    assert "| Retrieval |" not in table and "| OOD |" not in table and "| IND | 75.0 |" in table


def test_readers_accept_parquet_jsonl_and_save_to_disk(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 30)).save(images / "a.png")
    rows = [
        {"qry": "<|image_1|> classify", "qry_image_path": "a.png", "pos_text": "cat", "pos_image_path": ""}
    ]
    root = tmp_path / "train"
    (root / "P").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(root / "P" / "original-00000-of-00001.parquet"))
    _write_jsonl(root / "J" / "original.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "D" / "original"))
    for subset in ("P", "J", "D"):
        (row,) = read_train(root, subset, image_dir=images)
        assert row.qry_image == str(images / "a.png") and row.pos_image is None and row.neg_text == ""


def test_reader_errors_name_subset_row_and_path(tmp_path):
    root = tmp_path / "eval"
    _write_jsonl(root / "Good" / "test.jsonl", [_eval_row("q", ["a"])])
    with pytest.raises(DataError, match=r"no subset 'Nope'; available: Good"):
        read_eval(root, "Nope")
    _write_jsonl(root / "NoCol" / "test.jsonl", [{"qry_text": "q", "tgt_text": ["a"], "tgt_img_path": [""]}])
    with pytest.raises(DataError, match=r"subset 'NoCol'.*missing column\(s\) \['qry_img_path'\]"):
        read_eval(root, "NoCol")
    _write_jsonl(
        root / "NoImg" / "test.jsonl",
        [_eval_row("q", ["a"]), {**_eval_row("q", ["a"]), "qry_img_path": "x.png"}],
    )
    with pytest.raises(
        DataError, match=r"subset 'NoImg' row 1 \(.*test\.jsonl\), column 'qry_img_path': image not found: .*x\.png"
    ):
        read_eval(root, "NoImg", image_dir=tmp_path)
    with pytest.raises(DataError, match=r"no split 'original'"):
        read_train(root, "Good")
    with pytest.raises(DataError, match=r"unknown MMEB-train split"):
        read_train(root, "Good", split="test")
