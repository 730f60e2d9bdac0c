"""LLaVA-NeXT's "anyres" geometry: which tile grid an image gets (host, numpy), and where each of its
image tokens takes its feature from (device, jax; traced layouts under jit).

An image is its base tile (the whole image squashed to one tile) plus the tiles of the grid pinpoint
that fits it best. transformers lays the grid's patch features out as one large feature map, crops the
rows (or columns) that are letterbox padding, and appends ``image_newline`` after every row; the image's
tokens are the base tile's features, then that map row by row. The host describes each image by its
layout, 3 ints (tile rows, tile columns, crop: +p rows or -p columns cut on each side), and the device
turns layouts into one gather index over the projected tile features (``feature_index``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

NEWLINE = -1  # feature_index entry of an image_newline token


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What anyres needs (``cfg.anyres`` of the model config and of the image-processor settings)."""

    pinpoints: tuple[tuple[int, int], ...]  # (height, width) of the candidate grids, in pixels
    tile_size: int  # pixels per tile side
    grid: int  # patches per tile side (one feature each)


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
    geo = cfg.anyres
    h, w = select_best_resolution(height, width, geo.pinpoints)
    return h // geo.tile_size, w // geo.tile_size


def num_tiles(height: int, width: int, cfg) -> int:
    rows, cols = tile_grid(height, width, cfg)
    return 1 + rows * cols


def crop(height: int, width: int, rows: int, cols: int) -> int:
    """Letterbox padding of a ``rows x cols`` feature map showing a ``height x width`` image: +p rows or
    -p columns cut on each side (transformers' ``unpad_image``, same float arithmetic)."""
    if width / height > cols / rows:
        return (rows - int(round(height * (cols / width), 7))) // 2
    return -((cols - int(round(width * (rows / height), 7))) // 2)


def image_layout(height: int, width: int, cfg) -> np.ndarray:
    """The image's layout ``[tile rows, tile columns, crop]`` (int32)."""
    rows, cols = tile_grid(height, width, cfg)
    g = cfg.anyres.grid
    return np.array([rows, cols, crop(height, width, rows * g, cols * g)], np.int32)


def layouts(image_sizes, cfg) -> np.ndarray:
    """``image_sizes`` ``[I, 2]`` (height, width) -> layouts ``[I, 3]``."""
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2).tolist()
    return np.array([image_layout(h, w, cfg) for h, w in sizes], np.int32).reshape(-1, 3)


def _counts(layout, g: int):
    """Per image: tokens, tiles, kept feature-map columns, and rows/columns cut on each side (jnp or np)."""
    xp = jnp if isinstance(layout, jnp.ndarray) else np
    rows, cols, cut = layout[..., 0], layout[..., 1], layout[..., 2]
    cut_rows, cut_cols = xp.maximum(cut, 0), xp.maximum(-cut, 0)
    kept_rows, kept_cols = rows * g - 2 * cut_rows, cols * g - 2 * cut_cols
    real = rows > 0  # padding images [0, 0, 0]: no tiles, no tokens
    tokens = xp.where(real, g * g + kept_rows * (kept_cols + 1), 0)
    tiles = xp.where(real, 1 + rows * cols, 0)
    return tokens, tiles, kept_cols, cut_rows, cut_cols


def num_image_tokens(layout, cfg) -> int:
    """Image tokens of one layout (or all of ``[I, 3]``): base tile + kept map + a newline per row."""
    return int(np.sum(_counts(np.asarray(layout).reshape(-1, 3), cfg.anyres.grid)[0]))


def feature_index(rank, layout, cfg):
    """Gather index into the projected tile features ``[tiles * tokens_per_tile]`` (tiles concatenated
    in image order) of the image tokens of ranks ``rank`` (k: the k-th image token of the batch);
    ``NEWLINE`` for ``image_newline``. Works on traced ``rank`` and ``layout`` ``[I, 3]``."""
    g = cfg.anyres.grid
    n = g * g  # features per tile
    layout = jnp.asarray(layout, jnp.int32).reshape(-1, 3)
    tokens, tiles, kept_cols, cut_rows, cut_cols = _counts(layout, g)
    ends = jnp.cumsum(tokens)
    first_tile = jnp.cumsum(tiles) - tiles
    image = jnp.clip(jnp.searchsorted(ends, rank, side="right"), 0, layout.shape[0] - 1)
    local = rank - (ends - tokens)[image]
    in_base = local < g * g
    width = kept_cols[image] + 1  # a map row and its newline
    u = jnp.maximum(local - g * g, 0)
    r, c = u // jnp.maximum(width, 1), u % jnp.maximum(width, 1)
    rr, cc = r + cut_rows[image], c + cut_cols[image]
    tile = (rr // g) * layout[image, 1] + cc // g
    in_map = (first_tile[image] + 1 + tile) * n + (rr % g) * g + cc % g
    index = jnp.where(c == width - 1, NEWLINE, in_map)
    return jnp.where(in_base, first_tile[image] * n + local, index)
