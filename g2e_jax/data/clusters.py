"""Mined clusters on disk, and the batch sampler that feeds whole clusters to training.

File format (MMEB-train compatible, one cluster per line): the anchor row's fields
(``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ...) plus ``neg_samples``, the list
of its negative rows with the same fields, plus ``phase``. ``g2e-jax mine`` writes absolute image
paths (readers that join an ``image_dir`` with them keep them as they are); a relative path, as in
cluster files written elsewhere, is read relative to ``image_dir`` when one is given (the MMEB
convention), else relative to the cluster file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from g2e_jax.data.jsonl import InvalidJSON, json_lines
from g2e_jax.data.mmeb import TRAIN_COLUMNS

IMAGE_FIELDS = ("qry_image_path", "pos_image_path", "neg_image_path")
# Key of each row read back by ``read_clusters``: (file, line, member), member 0 the anchor and k the
# k-th of ``neg_samples``.
ORIGIN = "_origin"


def write_clusters(path: str | Path, clusters, rows: Sequence[Mapping]) -> None:
    """``clusters``: objects with ``anchor``, ``negatives`` (row indices) and ``phase``."""
    from g2e_jax.io import write_atomic

    lines = []
    for c in clusters:
        record = dict(rows[c.anchor])
        record["neg_samples"] = [dict(rows[n]) for n in c.negatives]
        record["phase"] = c.phase
        lines.append(json.dumps(record, ensure_ascii=False))
    write_atomic(path, "".join(line + "\n" for line in lines))


def read_clusters(path: str | Path, *, image_dir: str | Path | None = None) -> list[list[dict]]:
    """Each cluster as its list of rows, anchor first (the pairs training puts in one batch), with
    absolute image paths ("" for none; see the module docstring for relative ones)."""
    from g2e_jax.paths import resolve_in

    path = Path(path)
    base = path.parent if image_dir is None else image_dir

    def resolve(row: dict) -> dict:
        for field in IMAGE_FIELDS:
            if row.get(field):
                row[field] = resolve_in(base, row[field])
        return row

    if not path.is_file():
        raise FileNotFoundError(f"{path}: cluster file not found (run `g2e-jax mine` first)")
    clusters = []
    for number, record in json_lines(path):
        if isinstance(record, InvalidJSON):
            raise ValueError(f"{path} line {number}: {record.reason}")
        missing = [k for k in TRAIN_COLUMNS if k not in record]
        if missing:
            raise ValueError(f"{path} line {number}: missing field(s) {missing}")
        negatives = record.pop("neg_samples", [])
        record.pop("phase", None)
        members = [resolve(row) for row in (record, *negatives)]
        for k, member in enumerate(members):  # provenance for errors and skipped.jsonl
            member[ORIGIN] = (str(path.absolute()), number, k)
        clusters.append(members)
    return clusters


BATCH_SUBSETS = ("mixed", "same")


@dataclasses.dataclass
class ClusterBatchSampler:
    """Batches of whole clusters in an order fixed by the seed; ``batch(step)`` is a list of
    ``(subset, cluster id)``.

    ``batch_subsets="mixed"`` (the official run: Hugging Face's random sampler over every subset's
    clusters): an epoch is one permutation of all clusters of all subsets, cut into batches of
    ``clusters_per_batch`` (the last may hold fewer). ``"same"``: every batch from one subset; an
    epoch shuffles each subset's clusters, cuts them into batches (a subset's last batch may hold
    fewer), and shuffles the order of all batches. Either way batch ``step`` is computed directly
    from ``(seed, step)``: resuming at step k replays nothing, and each process may ask for any batch.
    Clusters smaller than ``top_k + 1`` rows (phase-2 leftovers, small subsets, plain rows) are kept as
    they are; training pads every batch to a fixed number of pairs and masks the padding, so a short
    cluster only means fewer in-batch negatives.
    """

    cluster_sizes: Mapping[str, Sequence[int]]  # subset -> rows per cluster (order = cluster ids)
    clusters_per_batch: int
    seed: int = 0
    batch_subsets: str = "same"

    def __post_init__(self):
        if self.clusters_per_batch < 1:
            raise ValueError(f"clusters_per_batch must be >= 1, got {self.clusters_per_batch}")
        if self.batch_subsets not in BATCH_SUBSETS:
            raise ValueError(f"unknown batch_subsets {self.batch_subsets!r}; expected one of {BATCH_SUBSETS}")
        self.subsets = sorted(s for s, sizes in self.cluster_sizes.items() if len(sizes))
        if not self.subsets:
            raise ValueError("no clusters to sample from")
        counts = [len(self.cluster_sizes[s]) for s in self.subsets]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # global id = offset + id
        per_batch = self.clusters_per_batch
        if self.batch_subsets == "mixed":
            self.steps_per_epoch = -(-int(self._offsets[-1]) // per_batch)
        else:
            self.steps_per_epoch = sum(-(-n // per_batch) for n in counts)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global cluster ids in batch order, and each batch's start in them."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1:]
        per_batch = self.clusters_per_batch
        if self.batch_subsets == "mixed":
            order = np.random.default_rng([self.seed, epoch]).permutation(int(self._offsets[-1]))
            starts = np.arange(0, len(order), per_batch)
        else:
            batches = []
            for k, subset in enumerate(self.subsets):
                rng = np.random.default_rng([self.seed, epoch, k])
                ids = self._offsets[k] + rng.permutation(len(self.cluster_sizes[subset]))
                batches += [ids[start : start + per_batch] for start in range(0, len(ids), per_batch)]
            shuffle = np.random.default_rng([self.seed, epoch, len(self.subsets)]).permutation(len(batches))
            plan = [batches[i] for i in shuffle]
            order = np.concatenate(plan)
            starts = np.cumsum([0] + [len(b) for b in plan[:-1]])
        self._epoch_cache = (epoch, order.astype(np.int64), np.asarray(starts, np.int64))
        return self._epoch_cache[1:]

    def batch(self, step: int) -> list[tuple[str, int]]:
        """The clusters of global batch ``step``, in order, each as (subset, cluster id)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        order, starts = self._epoch(epoch)
        end = starts[index + 1] if index + 1 < len(starts) else len(order)
        ids = order[starts[index] : end]
        k = np.searchsorted(self._offsets, ids, side="right") - 1
        return [(self.subsets[s], int(i - self._offsets[s])) for s, i in zip(k, ids)]

    def __call__(self, start_step: int = 0) -> Iterator[tuple[int, list[tuple[str, int]]]]:
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1

    def max_pairs(self) -> int:
        """The most pairs any batch can hold (the fixed batch shape training pads to)."""
        n = self.clusters_per_batch
        if self.batch_subsets == "mixed":
            return sum(sorted((x for s in self.subsets for x in self.cluster_sizes[s]), reverse=True)[:n])
        return max(sum(sorted(self.cluster_sizes[s], reverse=True)[:n]) for s in self.subsets)


def batch_label(clusters: Sequence[tuple[str, int]]) -> str:
    """The subset of a one-subset batch, else ``"mixed:<number of subsets>"`` (for the metrics log)."""
    subsets = {s for s, _ in clusters}
    return next(iter(subsets)) if len(subsets) == 1 else f"mixed:{len(subsets)}"
