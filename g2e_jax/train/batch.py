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


def build_batch(
    pairs: Sequence[tuple[PreparedRow, PreparedRow, int, int]], shape: BatchShape, pad_id: int
) -> dict:
    """``pairs``: (query row, target row, query content id, target content id); fewer than
    ``shape.pairs`` leaves padding rows (``valid`` False). Returns numpy arrays ``[K, G, ...]``."""
    if len(pairs) > shape.pairs:
        raise ValueError(f"{len(pairs)} pairs do not fit a batch of {shape.pairs}")
    k, g, c = shape.chunks, shape.cells, shape.rows_per_cell
    cells = [pairs[i * c : (i + 1) * c] for i in range(k * g)]
    out = {}
    for s, side in enumerate(SIDES):
        arrays = [collate([p[s] for p in cell], batch_size=c, users=shape.users, patches=shape.patches_per_cell,
                          pad_id=pad_id, patch_dim=shape.patch_dim) for cell in cells]  # fmt: skip
        out[side] = {key: np.stack([a[key] for a in arrays]).reshape((k, g) + arrays[0][key].shape)
                     for key in arrays[0]}  # fmt: skip
    ids = np.zeros((2, k * g * c), np.int64)
    valid = np.zeros((k * g * c,), bool)
    for i, p in enumerate(pairs):
        ids[:, i] = p[2], p[3]
        valid[i] = True
    # Same [K, G, c] layout as the rows, so every array shards along its cell axis (1).
    out["query_ids"], out["target_ids"] = ids[0].reshape(k, g, c), ids[1].reshape(k, g, c)
    out["valid"] = valid.reshape(k, g, c)
    return out
