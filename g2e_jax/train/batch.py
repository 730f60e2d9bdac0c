"""Host side of a training batch: pairs of prepared rows -> fixed-shape arrays in cells.

The global batch of N = K * G * c pairs is laid out as ``[K, G, c, ...]``: G cells per chunk are
sharded over the batch mesh axes, each cell holds c pairs with its own packed image patches, and
the K chunks are what GradCache walks one at a time (K = 1 without GradCache). Every shape is fixed
by the config, so one program serves every step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from g2e_jax.preprocess import PreparedRow, collate

SIDES = ("query", "target")


@dataclasses.dataclass(frozen=True)
class BatchShape:
    chunks: int  # K
    cells: int  # G (a multiple of the batch-parallel device count)
    rows_per_cell: int  # c
    users: int  # user-segment tokens per row
    patches_per_cell: int | None  # packed image patches per cell and side (None: text-only data)
    patch_dim: int

    @property
    def pairs(self) -> int:
        return self.chunks * self.cells * self.rows_per_cell


def build_batch(pairs: Sequence[tuple[PreparedRow, PreparedRow, int, int] | None], shape: BatchShape,
                pad_id: int, cells: range | None = None) -> dict:  # fmt: skip
    """Numpy arrays ``[K, len(cells), ...]`` for the given cells (default: all G).

    ``pairs[i]`` is (query row, target row, query content id, target content id) for global pair
    ``i = (k * G + cell) * c + r``, or None (padding, ``valid`` False). Only the pairs of the
    requested cells are touched, so each process can build just its own share of the batch.
    """
    k_count, g, c = shape.chunks, shape.cells, shape.rows_per_cell
    if len(pairs) > shape.pairs:
        raise ValueError(f"{len(pairs)} pairs do not fit a batch of {shape.pairs}")
    cells = range(g) if cells is None else cells

    def pair(k, cell, r):
        i = (k * g + cell) * c + r
        return pairs[i] if i < len(pairs) else None

    grid = [[[pair(k, cell, r) for r in range(c)] for cell in cells] for k in range(k_count)]
    out = {}
    for s, side in enumerate(SIDES):
        arrays = [[collate([p[s] for p in rows if p is not None], batch_size=c, users=shape.users,
                           patches=shape.patches_per_cell, pad_id=pad_id, patch_dim=shape.patch_dim)
                   for rows in chunk] for chunk in grid]  # fmt: skip
        out[side] = {key: np.stack([np.stack([a[key] for a in chunk]) for chunk in arrays])
                     for key in arrays[0][0] if arrays[0][0][key] is not None}  # fmt: skip
        if shape.patches_per_cell is None:
            out[side].update(pixel_values=None, image_grid_thw=None)
    ids = np.zeros((2, k_count, len(cells), c), np.int64)
    valid = np.zeros((k_count, len(cells), c), bool)
    for k, chunk in enumerate(grid):
        for j, rows in enumerate(chunk):
            for r, p in enumerate(rows):
                if p is not None:
                    ids[:, k, j, r] = p[2], p[3]
                    valid[k, j, r] = True
    out["query_ids"], out["target_ids"], out["valid"] = ids[0], ids[1], valid
    return out
