"""Mined clusters on disk, and the batch sampler that feeds whole clusters to training.

File format (MMEB-train compatible, one cluster per line): the anchor row's fields
(``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ...) plus ``neg_samples``, the list
of its negative rows with the same fields, plus ``phase``. Image paths are relative to the same
``image_dir`` as the source set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

ROW_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
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


def read_clusters(path: str | Path) -> list[list[dict]]:
    """Each cluster as its list of rows, anchor first (the pairs training puts in one batch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cluster file not found (run `g2e-jax mine` first)")
    clusters = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: invalid JSON ({e.msg})") from None
            missing = [k for k in ROW_FIELDS if k not in record]
            if missing:
                raise ValueError(f"{path} line {number}: missing field(s) {missing}")
            negatives = record.pop("neg_samples", [])
            record.pop("phase", None)
            members = [record, *negatives]
            for k, member in enumerate(members):  # provenance for errors and skipped.jsonl
                member[ORIGIN] = (str(path.absolute()), number, k)
            clusters.append(members)
    return clusters


@dataclasses.dataclass
class ClusterBatchSampler:
    """Batches of whole clusters, every batch from one subset, in an order fixed by the seed.

    An epoch shuffles each subset's clusters, cuts them into batches of ``clusters_per_batch`` (a
    subset's last batch may hold fewer clusters), and shuffles the order of all batches. Batch
    ``step`` is computed directly from ``(seed, step)``: resuming at step k replays nothing.
    Clusters smaller than ``top_k + 1`` rows (phase-2 leftovers, small subsets) are kept as they
    are; training pads every batch to a fixed number of pairs and masks the padding, so a short
    cluster only means fewer in-batch negatives.
    """

    cluster_sizes: Mapping[str, Sequence[int]]  # subset -> rows per cluster (order = cluster ids)
    clusters_per_batch: int
    seed: int = 0

    def __post_init__(self):
        if self.clusters_per_batch < 1:
            raise ValueError(f"clusters_per_batch must be >= 1, got {self.clusters_per_batch}")
        self.subsets = sorted(s for s, sizes in self.cluster_sizes.items() if len(sizes))
        if not self.subsets:
            raise ValueError("no clusters to sample from")
        self.steps_per_epoch = sum(
            -(-len(self.cluster_sizes[s]) // self.clusters_per_batch) for s in self.subsets
        )
        self._epoch_cache: tuple[int, list[tuple[str, np.ndarray]]] | None = None

    def _epoch(self, epoch: int) -> list[tuple[str, np.ndarray]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        batches = []
        for k, subset in enumerate(self.subsets):
            rng = np.random.default_rng([self.seed, epoch, k])
            order = rng.permutation(len(self.cluster_sizes[subset]))
            for start in range(0, len(order), self.clusters_per_batch):
                batches.append((subset, order[start : start + self.clusters_per_batch]))
        shuffle = np.random.default_rng([self.seed, epoch, len(self.subsets)]).permutation(len(batches))
        plan = [batches[i] for i in shuffle]
        self._epoch_cache = (epoch, plan)
        return plan

    def batch(self, step: int) -> tuple[str, np.ndarray]:
        """(subset, cluster ids) of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[index]

    def __call__(self, start_step: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        step = start_step
        while True:
            subset, ids = self.batch(step)
            yield step, subset, ids
            step += 1

    def max_pairs(self) -> int:
        """The most pairs any batch can hold (the fixed batch shape training pads to)."""
        return max(
            sum(sorted(sizes, reverse=True)[: self.clusters_per_batch]) for sizes in
            (self.cluster_sizes[s] for s in self.subsets)
        )  # fmt: skip
