"""Files the official PyTorch code writes, read without torch, every problem naming file and row.

``cli/evaluate.py`` (``--encode_output_path``), per subset:

    {subset}_qry, {subset}_tgt   pickle of (embeddings float32 [N, D], rows); rows[i] = {"text", "img_path"}:
                                 the unique (text, image) pairs of the query / target side, img_path
                                 relative to --image_dir ("" = no image)
    {subset}_score.json          {"acc", "num_correct", "num_pred"}

``cli/sample_mmeb.py`` writes the same pickles for a training subset, and
``{subset}_hard_negatives.json``: a list of anchor rows (MMEB-train fields) each with ``neg_samples``,
the rows of its cluster.

The pickles are opened with an unpickler that only rebuilds numpy arrays, lists, dicts and
strings, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

SIDES = ("qry", "tgt")
_NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in _NUMPY_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def official_subsets(directory) -> list[str]:
    """Subsets with both a ``_qry`` and a ``_tgt`` file, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: official output directory not found")
    names = {p.name[: -len("_qry")] for p in directory.glob("*_qry") if p.is_file()}
    subsets = sorted(n for n in names if (directory / f"{n}_tgt").is_file())
    if not subsets:
        raise ValueError(
            f"{directory}: no {{subset}}_qry + {{subset}}_tgt pickles (cli/evaluate.py output) found"
        )
    return subsets


def read_side(directory, subset: str, side: str) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(embeddings float32 [N, D], rows as (text, img_path)) of one official pickle."""
    path = Path(directory) / f"{subset}_{side}"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected cli/evaluate.py's {subset}_{side} pickle)")
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a readable official pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (embeddings, rows) tuple, got {type(obj).__name__}")
    emb, rows = obj
    emb = np.asarray(emb)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{path}: embeddings must be a float [N, D] array, got {emb.dtype} {emb.shape}")
    if not isinstance(rows, list) or len(rows) != len(emb):
        raise ValueError(
            f"{path}: {len(emb)} embeddings but {len(rows) if isinstance(rows, list) else rows!r} rows"
        )
    keys = []
    for i, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("img_path"), str)
        ):
            raise ValueError(  # noqa: TRY004
                f"{path}: row {i} must be a dict with string fields 'text' and 'img_path', got {row!r}"
            )
        keys.append((row["text"], row["img_path"]))
    if not np.isfinite(emb).all():
        bad = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise ValueError(f"{path}: row {bad} has a non-finite embedding")
    return emb.astype(np.float32), keys


def read_score(directory, subset: str) -> dict | None:
    """``{subset}_score.json`` ({"acc", "num_correct", "num_pred"}), or None when absent."""
    path = Path(directory) / f"{subset}_score.json"
    if not path.is_file():
        return None
    try:
        score = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(score, dict) or not isinstance(score.get("acc"), (int, float)):
        raise ValueError(f"{path}: expected an object with a numeric 'acc', got {score!r}")  # noqa: TRY004
    return score


# --- SaHa clusters --------------------------------------------------------------------------------------


def _member(row, where: str) -> tuple[str, str]:
    if not isinstance(row, dict) or "qry" not in row or "qry_image_path" not in row:
        raise ValueError(f"{where}: expected a row with 'qry' and 'qry_image_path', got {str(row)[:200]}")
    return (row["qry"], row["qry_image_path"] or "")


def read_official_clusters(directory) -> dict[str, list[tuple]]:
    """{subset: clusters}, each cluster its query keys (qry, qry_image_path), anchor first."""
    directory = Path(directory)
    files = sorted(directory.glob("*_hard_negatives.json")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory}: no {{subset}}_hard_negatives.json (cli/sample_mmeb.py output)")
    out = {}
    for path in files:
        try:
            anchors = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(anchors, list):
            raise ValueError(f"{path}: expected a list of anchor rows")  # noqa: TRY004
        clusters = []
        for i, anchor in enumerate(anchors):
            where = f"{path} cluster {i}"
            negatives = anchor.get("neg_samples") if isinstance(anchor, dict) else None
            if not isinstance(negatives, list):
                raise ValueError(f"{where}: no 'neg_samples' list")  # noqa: TRY004
            clusters.append(tuple(_member(r, where) for r in [anchor, *negatives]))
        out[path.name[: -len("_hard_negatives.json")]] = clusters
    return out


def read_g2e_clusters(directory) -> dict[str, list[tuple]]:
    """The same from ``g2e-jax mine``'s ``<subset>/original.jsonl``."""
    from g2e_jax.data.clusters import read_clusters

    directory = Path(directory)
    files = sorted(directory.glob("*/original.jsonl")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory}: no <subset>/original.jsonl (g2e-jax mine output)")
    return {
        f.parent.name: [
            tuple(_member(r, f"{f} cluster {i}") for r in c) for i, c in enumerate(read_clusters(f))
        ]
        for f in files
    }


def compare_clusters(official: list[tuple], ours: list[tuple]) -> dict:
    """Cluster counts, identical clusters (same member set), and Jaccard similarities of member sets:
    between the clusters with the same anchor, and from each official cluster to its best match."""
    ours_sets = [frozenset(c) for c in ours]
    by_member: dict = {}
    for k, c in enumerate(ours_sets):
        for m in c:
            by_member.setdefault(m, []).append(k)
    by_anchor = {c[0]: frozenset(c) for c in ours}
    ours_all = set(ours_sets)

    def jaccard(a, b):
        return len(a & b) / len(a | b)

    identical, anchor_j, best_j = 0, [], []
    for c in official:
        s = frozenset(c)
        identical += s in ours_all
        if c[0] in by_anchor:
            anchor_j.append(jaccard(s, by_anchor[c[0]]))
        candidates = {k for m in s for k in by_member.get(m, ())}
        best_j.append(max((jaccard(s, ours_sets[k]) for k in candidates), default=0.0))
    return {
        "official_clusters": len(official),
        "g2e_jax_clusters": len(ours),
        "identical_clusters": int(identical),
        "same_anchor": len(anchor_j),
        "mean_jaccard_same_anchor": float(np.mean(anchor_j)) if anchor_j else None,
        "mean_best_jaccard": float(np.mean(best_j)) if best_j else None,
    }
