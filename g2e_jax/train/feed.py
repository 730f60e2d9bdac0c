"""The global batch of each training step: this process's rows preprocessed, its cells built, and
one global array per leaf on the mesh, the next step's built on a host thread meanwhile.

Every function takes the trainer's ``Run`` (``g2e_jax.train.trainer``) as ``run``; the batch of step
``s`` is a function of (seed, s) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from g2e_jax.data.clusters import batch_label
from g2e_jax.mesh import BATCH_AXES
from g2e_jax.train.batch import build_batch, fit_sides, side_needs


def batch_spec(ndim: int) -> P:
    return P(None, BATCH_AXES, *([None] * (ndim - 2))) if ndim >= 2 else P()


@dataclasses.dataclass
class LocalRows:
    """This process's preprocessed pairs of one batch: host work only, no device and no collective."""

    pairs: list
    cells: range
    label: str
    skipped: list  # bad rows met (data.bad_rows=skip), for skipped.jsonl


def local_rows(run, step: int) -> LocalRows:
    """The pairs of batch ``step`` that this process's cells hold, preprocessed."""
    clusters = run.sampler.batch(step)
    g, procs, me = run.shape.cells, jax.process_count(), jax.process_index()
    cells = range(g * me // procs, g * (me + 1) // procs)
    c, k = run.shape.rows_per_cell, run.shape.chunks
    wanted = {(kk * g + cell) * c + r for kk in range(k) for cell in cells for r in range(c)}
    pairs = run.data.pairs(clusters, wanted)
    skipped = list(run.data.skipped)
    run.data.skipped.clear()
    return LocalRows(pairs, cells, batch_label(clusters), skipped)


def global_batch(run, step: int, rows: LocalRows | None = None):
    """This process builds its cells of batch ``step`` (from ``rows`` when already prepared); the
    result is one global array per leaf, and the batch's label."""
    rows = local_rows(run, step) if rows is None else rows
    g, procs = run.shape.cells, jax.process_count()
    sides = run.sides
    if run.cfg.train.shape_buckets:
        need = side_needs(rows.pairs, run.shape, rows.cells)
        if procs > 1:  # every process must build the same shapes
            need = np.asarray(multihost_utils.process_allgather(need)).max(axis=0)
        sides = fit_sides(run.shape, need, per_octave=run.cfg.train.bucket_steps)
    local = build_batch(rows.pairs, run.shape, run.preprocessor.pad_id, cells=rows.cells, sides=sides)

    # The whole tree in one call: with one process that is one batched transfer, where a call per
    # leaf cost ~3 ms a step (11 leaves), a tenth of a tiny step on 2 cores.
    shardings = jax.tree.map(lambda x: NamedSharding(run.mesh, batch_spec(x.ndim)), local)
    shapes = jax.tree.map(lambda x: (x.shape[0], g) + x.shape[2:], local)
    return jax.make_array_from_process_local_data(shardings, local, shapes), rows.label


class BatchesAhead:
    """Batch ``s + 1`` built on a host thread while the device runs step ``s``.

    Measured: on the tiny model the host's share of a step (preprocessing, collation, transfers) was
    about as long as the step itself, and ran in series with it. The thread does what involves no
    collective: everything with one process, the rows (preprocessing, the bulk) with several, where
    the shape-bucket all-gather stays on the main thread so that every process issues its
    collectives in the same order. The data order is unchanged: batch ``s`` is still a function of
    (seed, step) only."""

    def __init__(self, run, steps: range):
        from concurrent.futures import ThreadPoolExecutor

        self.run, self.steps = run, steps
        self.whole = jax.process_count() == 1 or not run.cfg.train.shape_buckets
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="g2e-batches")
        self._ahead = {}

    def _build(self, step: int):
        rows = local_rows(self.run, step)
        # Looked up at call time (module global), so a test can wrap it.
        return (*global_batch(self.run, step, rows), rows.skipped) if self.whole else rows

    def get(self, step: int):
        """(batch, label, skipped rows) of ``step``; starts building ``step + 1``."""
        future = self._ahead.pop(step, None) or self._pool.submit(self._build, step)
        if step + 1 in self.steps:
            self._ahead[step + 1] = self._pool.submit(self._build, step + 1)
        built = future.result()
        if self.whole:
            return built
        return (*global_batch(self.run, step, built), built.skipped)

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
