"""Training data: clusters (SaHa output) or plain MMEB rows, preprocessed on demand per batch.

Every source is a set of subsets, each a list of clusters, each a list of (query, positive) rows
(a plain row is a cluster of one). A batch takes whole clusters, of any subsets or of one (see
``ClusterBatchSampler``); rows are preprocessed only when a batch needs them, by the process that
needs them. Plain rows (``mmeb``, ``prepared``) are capped at ``data.num_sample_per_subset`` per
subset as the official in-batch training does (``g2e_jax.data.mmeb.sample_rows``); mined clusters
are never capped (nor are they officially).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from g2e_jax.data.clusters import ORIGIN, read_clusters
from g2e_jax.data.mmeb import read_train, sample_rows
from g2e_jax.data.prepared import content_id
from g2e_jax.preprocess import InputError, PreparedInputs

BAD_ROWS = ("error", "skip")
_SOURCE_FIELDS = {
    ("query", "text"): "qry",
    ("query", "image"): "qry_image_path",
    ("document", "text"): "pos_text",
    ("document", "image"): "pos_image_path",
}


class BadRowError(ValueError):
    """A row that cannot be used (``data.bad_rows="error"``); the message names subset, file, line, field."""


def _resolve(image_dir: Path | None, value) -> str | None:
    if value in (None, ""):
        return None
    path = Path(value)
    return str(path if image_dir is None or path.is_absolute() else image_dir / path)


class TrainData:
    def __init__(
        self,
        clusters: dict[str, list[list]],
        preprocessor,
        *,
        image_dir=None,
        cache_rows: int = 50_000,
        prepared=None,
        bad_rows: str = "error",
    ):
        """``clusters[subset]``: clusters, each a list of row dicts (MMEB fields) or, with a
        ``prepared`` dataset, of its record indices (already tokenised and patchified).

        ``bad_rows``: "error" raises ``BadRowError`` at a row that cannot be preprocessed; "skip" puts
        padding in its place (the batch holds one pair less: which rows a batch holds is still a function
        of the data, the seed and the step, so a resumed run skips the same rows) and appends a record to
        ``self.skipped`` for the caller to log."""
        if bad_rows not in BAD_ROWS:
            raise ValueError(f"unknown data.bad_rows {bad_rows!r}; expected one of {BAD_ROWS}")
        self.bad_rows = bad_rows
        self.skipped: list[dict] = []
        self.clusters = clusters
        self.preprocessor = preprocessor
        self.prepared = prepared
        self.prepared_inputs = None if prepared is None else PreparedInputs(prepared)
        self.image_dir = None if image_dir is None else Path(image_dir)
        self._cache: OrderedDict = OrderedDict()
        self._cache_rows = cache_rows

    @classmethod
    def from_config(cls, cfg, preprocessor) -> "TrainData":
        """``cfg.data.source``: "clusters" (``clusters_dir/<subset>/original.jsonl`` from ``g2e-jax
        mine``) or "mmeb" (plain rows of ``root/<subset>``, each its own cluster)."""
        subsets = list(cfg.data.subsets)
        cap = cfg.data.get("num_sample_per_subset")
        bad_rows = cfg.data.get("bad_rows", "error")
        if cfg.data.source == "clusters":
            if cfg.data.clusters_dir is None:
                raise ValueError("data.source=clusters needs --config.data.clusters_dir (the mine output)")
            folder = Path(cfg.data.clusters_dir)
            clusters = {
                s: read_clusters(folder / s / "original.jsonl", image_dir=cfg.data.image_dir) for s in subsets
            }
        elif cfg.data.source == "mmeb":
            if cfg.data.root is None:
                raise ValueError("data.source=mmeb needs --config.data.root")
            clusters = {}
            for s in subsets:
                rows = read_train(  # absolute paths
                    cfg.data.root,
                    s,
                    cfg.data.split,
                    image_dir=cfg.data.image_dir,
                    num_samples=cap,
                    check_images=False,  # a missing image is a bad row like any other (bad_rows)
                )
                clusters[s] = [
                    [
                        {
                            "qry": r.qry,
                            "qry_image_path": r.qry_image or "",
                            "pos_text": r.pos_text,
                            "pos_image_path": r.pos_image or "",
                            ORIGIN: (r.file, r.line, None),
                        }
                    ]
                    for r in rows
                ]
        elif cfg.data.source == "prepared":
            from g2e_jax.data.prepared import PreparedDataset

            if cfg.data.prepared_dir is None:
                raise ValueError(
                    "data.source=prepared needs --config.data.prepared_dir (the `g2e-jax prepare` output)"
                )
            prepared = PreparedDataset(cfg.data.prepared_dir)
            if preprocessor is not None:  # the records hold this backbone's token ids and image rows
                PreparedInputs(prepared).check_model(preprocessor.config.model_type, preprocessor.image_config)
            # Records are tokenised and resized once: they must be what this config would make.
            settings = {
                "max_len": cfg.max_len, "image_resolution": cfg.image_resolution, "scheme": cfg.prompt.scheme
            }
            differ = {k: (prepared.meta.get(k), v) for k, v in settings.items() if prepared.meta.get(k) != v}
            if differ:
                raise ValueError(
                    f"{cfg.data.prepared_dir}: prepared with other settings than this config's "
                    + ", ".join(f"{k}={have!r} (config: {want!r})" for k, (have, want) in differ.items())
                    + "; re-run `g2e-jax prepare` with the config's values or override them"
                )
            missing = [s for s in subsets if s not in prepared.subsets]
            if missing:
                raise ValueError(f"{cfg.data.prepared_dir}: no subset(s) {missing}; has {prepared.subsets}")
            clusters = {
                s: [[prepared.index(s, int(r))] for r in sample_rows(prepared._subsets[s]["rows"], cap)]
                for s in subsets
            }
            return cls(clusters, preprocessor, prepared=prepared, bad_rows=bad_rows)
        else:
            raise ValueError(f"unknown data.source {cfg.data.source!r}; expected clusters, mmeb or prepared")
        # Rows already hold absolute image paths: joining data.image_dir again would double it.
        return cls(clusters, preprocessor, bad_rows=bad_rows)

    def cluster_sizes(self) -> dict[str, list[int]]:
        return {s: [len(c) for c in cl] for s, cl in self.clusters.items()}

    def side_maxima(self, rows_per_cell: int, *, progress: bool = True) -> np.ndarray:
        """``[2 sides, 2]`` over every row of the data (``train.batch.side_needs`` of any batch is
        within it): each side's longest user segment, and its ``rows_per_cell`` largest images'
        patches together, the most one cell can hold. One pass preprocessing every row (kept in the
        row cache): for data sets of thousands of rows, not MMEB's millions. A row that cannot be
        preprocessed raises (``data.bad_rows="error"``) or is left out, as the run will skip it."""
        longest = [0, 0]
        largest: list[list[int]] = [[], []]  # min-heaps of each side's largest patch counts
        rows = [(subset, row) for subset, clusters in self.clusters.items() for cluster in clusters for row in cluster]
        for subset, row in tqdm(rows, desc="fitting the batch shape to the data", unit="row", disable=not progress):
            try:
                pair = self._pair(subset, row)
            except BadRowError:
                if self.bad_rows == "error":
                    raise
                continue
            for s in range(2):
                longest[s] = max(longest[s], len(pair[s].user_ids))
                if pair[s].patches is not None:
                    heapq.heappush(largest[s], len(pair[s].patches))
                    if len(largest[s]) > rows_per_cell:
                        heapq.heappop(largest[s])
        return np.array([[longest[s], sum(largest[s])] for s in range(2)], np.int64)

    def pairs(self, clusters, wanted: set[int] | None = None) -> list:
        """The pairs of ``clusters`` (``(subset, cluster id)`` each) in order, anchors first within
        each cluster; positions not in ``wanted`` are returned as ``"skip"`` placeholders without
        preprocessing."""
        rows = [(subset, row) for subset, i in clusters for row in self.clusters[subset][int(i)]]
        out = []
        for position, (subset, row) in enumerate(rows):
            if wanted is not None and position not in wanted:
                out.append("skip")
                continue
            try:
                out.append(self._pair(subset, row))
            except BadRowError as e:
                if self.bad_rows == "error":
                    raise
                self.skipped.append(e.record)
                out.append(None)  # padding: the batch holds one pair less
        return out

    def _pair(self, subset: str, row):
        """(query, target, query content id, target content id) of one row, or BadRowError."""
        if self.prepared is not None:
            try:
                record = self.prepared[row]
                return (
                    self.prepared_inputs(record, "qry"),
                    self.prepared_inputs(record, "pos"),
                    int(record["qry_content_id"]),
                    int(record["pos_content_id"]),
                )
            except (ValueError, OSError, KeyError) as e:
                raise self._bad(subset, row, "<record>", f"{type(e).__name__}: {e}") from None
        sides = []
        for role, text_key, image_key in (
            ("query", "qry", "qry_image_path"),
            ("document", "pos_text", "pos_image_path"),
        ):
            try:
                sides.append(
                    self._prepared(row[text_key], _resolve(self.image_dir, row[image_key]), role, subset)
                )
            except InputError as e:
                raise self._bad(subset, row, _SOURCE_FIELDS.get((role, e.field), e.field), e.reason) from None
        return (
            *sides,
            content_id(row["qry"], row["qry_image_path"] or None),
            content_id(row["pos_text"], row["pos_image_path"] or None),
        )

    def origin(self, subset: str, row) -> dict:
        """Where a row came from: file and line (and cluster member), or the prepared record."""
        if self.prepared is not None:
            return {"file": str(Path(self.prepared.path).absolute()), "record": int(row)}
        file, line, member = row.get(ORIGIN, (None, None, None))
        return {"file": file, "line": line, **({} if member is None else {"member": member})}

    def _bad(self, subset: str, row, field: str, reason: str) -> BadRowError:
        where = self.origin(subset, row)
        place = ", ".join(f"{k} {v}" for k, v in where.items() if k != "file" and v is not None)
        error = BadRowError(f"subset {subset!r}, {where['file']} {place}, field {field!r}: {reason}")
        error.record = {"subset": subset, **where, "field": field, "reason": reason}
        return error

    def _prepared(self, text, image, role, subset):
        key = (text, image, role, subset)
        row = self._cache.get(key)
        if row is None:
            (row,) = self.preprocessor.prepare([text], [image], role=role, subset=subset, progress=False)
            self._cache[key] = row
            if len(self._cache) > self._cache_rows:
                self._cache.popitem(last=False)
        return row
