"""Host side of a training batch: pairs of prepared rows -> fixed-shape arrays in cells.

The global batch of N = K * G * c pairs is laid out as ``[K, G, c, ...]``: G cells per chunk are
sharded over the batch mesh axes, each cell holds c pairs with its own packed image patches, and
the K chunks are what GradCache walks one at a time (K = 1 without GradCache). ``BatchShape`` is
the capacity the config allows; ``fit_sides`` shrinks each side to buckets of what a batch holds (a
text-only side runs no vision tower, short targets are not padded to the queries' length), so a
few programs serve every step instead of one that always pays for the longest possible rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from g2e_jax.data.rows import PreparedRow
from g2e_jax.preprocess import bucket, collate

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


Pairs = Sequence[tuple[PreparedRow, PreparedRow, int, int] | None]


def _grid(pairs: Pairs, shape: BatchShape, cells: range | None):
    """``[K][cells][c]`` pairs (None: padding); pair ``i = (k * G + cell) * c + r``."""
    k_count, g, c = shape.chunks, shape.cells, shape.rows_per_cell
    if len(pairs) > shape.pairs:
        raise ValueError(f"{len(pairs)} pairs do not fit a batch of {shape.pairs}")
    cells = range(g) if cells is None else cells

    def pair(k, cell, r):
        i = (k * g + cell) * c + r
        return pairs[i] if i < len(pairs) else None

    return [[[pair(k, cell, r) for r in range(c)] for cell in cells] for k in range(k_count)]


def side_needs(pairs: Pairs, shape: BatchShape, cells: range | None = None) -> np.ndarray:
    """``[2 sides, 2]``: the longest user segment and the most image patches in one cell, per side,
    over the given cells (each process measures its own; the maxima over processes fit them all)."""
    need = np.zeros((len(SIDES), 2), np.int64)
    for chunk in _grid(pairs, shape, cells):
        for rows in chunk:
            for s in range(len(SIDES)):
                side = [p[s] for p in rows if p is not None]
                need[s, 0] = max([need[s, 0]] + [len(r.user_ids) for r in side])
                need[s, 1] = max(need[s, 1], sum(len(r.patches) for r in side if r.patches is not None))
    return need


def fit_sides(shape: BatchShape, need: np.ndarray, *, seq_base: int = 16, patch_base: int = 64,
              per_octave: int | None = None) -> dict:  # fmt: skip
    """Per side (users, patches per cell): ``need`` rounded up to shape buckets (``bucket``, with
    ``per_octave`` sizes per doubling), within the capacity; patches None where the side holds no
    image."""
    sides = {}
    for s, side in enumerate(SIDES):
        longest, patches = (int(x) for x in need[s])
        if longest > shape.users:
            raise ValueError(f"{side} rows need {longest} user tokens; the batch holds {shape.users}")
        if patches and (shape.patches_per_cell is None or patches > shape.patches_per_cell):
            raise ValueError(
                f"{side} images need {patches} patches per cell; the batch holds {shape.patches_per_cell}"
            )
        sides[side] = (
            min(bucket(max(longest, 1), seq_base, per_octave=per_octave), shape.users),
            min(bucket(patches, patch_base, per_octave=per_octave), shape.patches_per_cell) if patches else None,
        )
    return sides


def build_batch(pairs: Pairs, shape: BatchShape, pad_id: int, cells: range | None = None,
                sides: dict | None = None) -> dict:  # fmt: skip
    """Numpy arrays ``[K, len(cells), ...]`` for the given cells (default: all G).

    ``pairs[i]`` is (query row, target row, query content id, target content id) for global pair
    ``i = (k * G + cell) * c + r``, or None (padding, ``valid`` False). Only the pairs of the
    requested cells are touched, so each process can build just its own share of the batch.
    ``sides`` (``fit_sides``) gives each side's (users, patches per cell); default: the capacity.
    """
    k_count, c = shape.chunks, shape.rows_per_cell
    grid = _grid(pairs, shape, cells)
    cells = range(shape.cells) if cells is None else cells
    out = {}
    for s, side in enumerate(SIDES):
        users, patches = (shape.users, shape.patches_per_cell) if sides is None else sides[side]
        arrays = [[collate([p[s] for p in rows if p is not None], batch_size=c, users=users,
                           patches=patches, pad_id=pad_id, patch_dim=shape.patch_dim)
                   for rows in chunk] for chunk in grid]  # fmt: skip
        out[side] = {key: np.stack([np.stack([a[key] for a in chunk]) for chunk in arrays])
                     for key in arrays[0][0] if arrays[0][0][key] is not None}  # fmt: skip
        if patches is None:
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
