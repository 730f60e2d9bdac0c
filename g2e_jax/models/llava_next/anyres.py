"""LLaVA-NeXT's "anyres" geometry on the host (numpy): which tile grid an image gets, and where each of
its image features comes from.

An image is its base tile (the whole image squashed to one tile) plus the tiles of the grid pinpoint
that fits it best. The model lays the grid's patch features out as one large feature map, crops the
rows (or columns) that are letterbox padding, and appends ``image_newline`` after every row. Here that
packing is one gather index per image: entry k names the flattened tile feature that becomes image
token k, or -1 for ``image_newline``. The device side is then a single gather (static shapes, jit-able).
"""

from __future__ import annotations

import numpy as np

NEWLINE = -1


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` keeping the most of the image's pixels, then wasting the fewest."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    return best


def tile_grid(height: int, width: int, cfg) -> tuple[int, int]:
    """(rows, cols) of tiles after the base tile."""
    h, w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
    side = cfg.vision.image_size
    return h // side, w // side


def num_tiles(height: int, width: int, cfg) -> int:
    rows, cols = tile_grid(height, width, cfg)
    return 1 + rows * cols


def unpadded_extent(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a ``rows x cols`` feature map that show the image (not its padding)."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


def image_feature_index(height: int, width: int, cfg, first_tile: int = 0) -> np.ndarray:
    """Gather index ``[tokens]`` of one image whose tiles start at tile ``first_tile``: its base tile's
    features, then the unpadded grid row by row, each row followed by ``NEWLINE``."""
    g, n = cfg.vision.grid, cfg.tokens_per_tile
    tile_rows, tile_cols = tile_grid(height, width, cfg)
    r = np.arange(tile_rows * g)[:, None]
    c = np.arange(tile_cols * g)[None, :]
    tile = (r // g) * tile_cols + c // g
    grid = (first_tile + 1 + tile) * n + (r % g) * g + c % g
    rows, cols = unpadded_extent(height, width, tile_rows * g, tile_cols * g)
    grid = grid[rows, cols]
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), NEWLINE)], axis=1)
    return np.concatenate([first_tile * n + np.arange(n), grid.reshape(-1)]).astype(np.int32)


def feature_index(image_sizes, cfg, tiles_per_image: int | None = None) -> np.ndarray:
    """Gather index of every image (``image_sizes`` ``[I, 2]`` as (height, width)), concatenated.

    Tiles are those of ``pixel_values``: concatenated over images (``tiles_per_image=None``), or padded
    to ``tiles_per_image`` per image (the processor's ``[I, tiles, C, S, S]``).
    """
    out, first = [], 0
    for i, (h, w) in enumerate(np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2).tolist()):
        if tiles_per_image is not None:
            first = i * tiles_per_image
        out.append(image_feature_index(h, w, cfg, first))
        first += num_tiles(h, w, cfg)
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def num_image_tokens(height: int, width: int, cfg) -> int:
    return int(image_feature_index(height, width, cfg).size)
