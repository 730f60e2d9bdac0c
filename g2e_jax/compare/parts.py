"""The rows ``g2e-jax compare`` encodes, as parts (one role, one subset): from a JSONL file, from
MMEB-format subsets, or from the official ``cli/evaluate.py`` output files, with the MMEB subsets'
scoring tables (each query row's candidates) for Precision@1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from g2e_jax.compare import official as off


@dataclasses.dataclass
class Part:
    """Rows encoded together: one role, one subset (or None), optionally the official embeddings."""

    name: str
    role: str
    subset: str | None
    ids: list[str]
    texts: list[str]
    images: list[str | None]
    official: np.ndarray | None = None  # [N, D] float32, from the files or the PyTorch side
    ours: np.ndarray | None = None  # [N, D] float32, g2e_jax
    cos: np.ndarray | None = None  # [N] per-row cosine (official, ours)
    diff: np.ndarray | None = None  # [N] per-row max abs difference


@dataclasses.dataclass
class Scoring:
    """One MMEB subset's eval rows as (query row, candidate rows) into its query and target parts."""

    queries: Part
    targets: Part
    rows: list[tuple[int, list[int]]]
    official_score: dict | None = None


def jsonl_parts(cfg, input_path, role) -> list[Part]:
    """One part: the file's rows (validated as for `g2e-jax embed`), all with ``role``."""
    from g2e_jax.data.jsonl import read_embed_rows

    if role not in ("query", "document"):
        raise ValueError(f"--role must be query or document, got {role!r}")
    rows, _ = read_embed_rows(input_path)
    rows = rows[: cfg.limit] if cfg.limit else rows
    if not rows:
        raise ValueError(f"{input_path}: no rows")
    return [
        Part(
            Path(input_path).name,
            role,
            cfg.subset,
            [r.id for r in rows],
            [r.text for r in rows],
            [r.image for r in rows],
        )
    ]


def _subsets(cfg) -> list[str]:
    """The configured subsets: ``data.subsets``, else those of ``data.groups_file`` (as ``eval``
    reads it), else none (the caller's default)."""
    if cfg.data.subsets:
        return list(cfg.data.subsets)
    if cfg.data.get("groups_file"):
        from g2e_jax.eval.mmeb import load_groups

        return list(load_groups(cfg.data.groups_file))
    return []


def mmeb_parts(cfg) -> tuple[list[Part], list[Scoring]]:
    from g2e_jax.data.mmeb import available_subsets, read_eval

    subsets = _subsets(cfg) or available_subsets(cfg.data.root)
    if not subsets:
        raise ValueError(f"{cfg.data.root}: no subset folders")
    parts, scorings = [], []
    for subset in subsets:
        rows = read_eval(cfg.data.root, subset, image_dir=cfg.data.image_dir)
        rows = rows[: cfg.limit] if cfg.limit else rows
        q_index: dict = {}
        c_index: dict = {}
        table = []
        for r in rows:
            q = q_index.setdefault((r.qry_text, r.qry_image), len(q_index))
            table.append((q, [c_index.setdefault(k, len(c_index)) for k in zip(r.tgt_texts, r.tgt_images)]))
        queries = _part(f"{subset}_qry", "query", subset, list(q_index))
        targets = _part(f"{subset}_tgt", "document", subset, list(c_index))
        parts += [queries, targets]
        scorings.append(Scoring(queries, targets, table))
    return parts, scorings


def _part(name, role, subset, keys, official=None) -> Part:
    return Part(
        name,
        role,
        subset,
        [f"{name}#{k}" for k in range(len(keys))],
        [t for t, _ in keys],
        [im for _, im in keys],
        official,
    )


def _image_path(image_dir, value: str, where: str) -> str | None:
    """An official img_path ("" = none) as the eval reader resolves it (relative to image_dir)."""
    if not value:
        return None
    if Path(value).is_absolute():
        path = Path(value)
    elif image_dir is None:
        raise ValueError(f"{where}: image {value!r} is relative; set --config.data.image_dir")
    else:
        path = Path(image_dir) / value
    if not path.is_file():
        raise ValueError(f"{where}: image not found: {path}")
    return str(path)


def offline_parts(cfg, official_dir) -> tuple[list[Part], list[Scoring]]:
    from g2e_jax.data.mmeb import read_eval

    available = off.official_subsets(official_dir)
    subsets = _subsets(cfg) or available
    missing = [s for s in subsets if s not in available]
    if missing:
        raise ValueError(f"{official_dir}: no {{subset}}_qry/_tgt pickles for {missing}; found {available}")
    parts, scorings = [], []
    for subset in subsets:
        sides = {}
        for side, role in (("qry", "query"), ("tgt", "document")):
            emb, keys = off.read_side(official_dir, subset, side)
            file = Path(official_dir) / f"{subset}_{side}"
            resolved = [
                (t, _image_path(cfg.data.image_dir, p, f"{file} row {i}")) for i, (t, p) in enumerate(keys)
            ]
            sides[side] = _part(f"{subset}_{side}", role, subset, resolved, emb)
        parts += [sides["qry"], sides["tgt"]]
        if cfg.data.root is None:
            continue
        q_index = {(t, im): i for i, (t, im) in enumerate(zip(sides["qry"].texts, sides["qry"].images))}
        t_index = {(t, im): i for i, (t, im) in enumerate(zip(sides["tgt"].texts, sides["tgt"].images))}
        table = []
        for i, r in enumerate(read_eval(cfg.data.root, subset, image_dir=cfg.data.image_dir)):
            key = (r.qry_text, r.qry_image)
            if key not in q_index:
                raise ValueError(
                    f"{official_dir}/{subset}_qry has no row for eval row {i}'s query {key!r}: "
                    "the official run used other data (or another image_dir)"
                )
            cands = []
            for key in zip(r.tgt_texts, r.tgt_images):
                if key not in t_index:
                    raise ValueError(
                        f"{official_dir}/{subset}_tgt has no row for eval row {i}'s candidate {key!r}"
                    )
                cands.append(t_index[key])
            table.append((q_index[(r.qry_text, r.qry_image)], cands))
        scorings.append(Scoring(sides["qry"], sides["tgt"], table, off.read_score(official_dir, subset)))
    return parts, scorings
