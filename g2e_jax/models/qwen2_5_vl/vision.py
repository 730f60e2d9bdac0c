"""Qwen2.5-VL vision tower: its family's (Qwen2-VL's) parts (patch embedding, 2-D rotary, per-image attention,
patch merger) with RMSNorm, a SwiGLU MLP, and window attention in every block not listed in
``fullatt_block_indexes``.

As in transformers, the merged 2x2 units are reordered window by window before the blocks and put
back in processor order after the merger. Each image keeps its place in that order, so the blocks
with full attention use Qwen2-VL's per-image layout unchanged; windows become contiguous runs of
at most ``window_patches`` patches. Everything works on traced ``grid_thw`` under ``jit``.

The blocks are one stack run by one scan whatever ``fullatt_block_indexes`` holds: each block's kind
(full or window attention) is a per-layer scanned boolean, and the body picks the grouping with
``lax.cond``. The predicate comes from the config, never from the batch, so it stays unbatched under
``vmap`` (training's cells) and ``cond`` runs one branch: the program holds one block and both
groupings, flat in depth. Scanning over repeating groups would need the full-attention blocks at a
period dividing the depth (true of the released 7 window + 1 full, not of every config: the tiny
model's, tests'), and would put the group's blocks, not one, in the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from g2e_jax.models.qwen2_5_vl.config import Qwen2_5VisionConfig
from g2e_jax.models.common.layers import GatedMLP, attention, scan_layers
from g2e_jax.models.qwen2_vl.vision import VisionTower, rms_norm


class WindowLayout:
    """The window order of the merged units, and attention within windows in that order."""

    def __init__(self, grid_thw, num_patches: int, cfg: Qwen2_5VisionConfig):
        m, ws = cfg.spatial_merge_size, cfg.window_merged
        unit = m * m
        grid = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
        t, h, w = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m  # merged grid of each image
        ends = jnp.cumsum(t * h * w)
        starts = ends - t * h * w
        u = jnp.arange(num_patches // unit, dtype=jnp.int32)
        image = jnp.minimum(jnp.searchsorted(ends, u, side="right"), grid.shape[0] - 1).astype(jnp.int32)
        valid = u < ends[-1]
        local = jnp.where(valid, u - starts[image], 0)
        frame_size = jnp.maximum(h * w, 1)[image]
        width = jnp.maximum(w, 1)[image]
        frame, row, col = local // frame_size, (local % frame_size) // width, local % width
        windows_per_row = (width + ws - 1) // ws
        window = (row // ws) * windows_per_row + col // ws  # < units per frame: no window is empty
        # A key per window, ordered by image, frame, window row, window column; padding units last.
        key = jnp.where(valid, starts[image] + frame * frame_size + window, num_patches)
        self.order = jnp.argsort(key, stable=True)  # transformers' window_index
        self.inverse = jnp.argsort(self.order)
        self.patch_order = (self.order[:, None] * unit + jnp.arange(unit)).reshape(-1)
        # Window of each patch in window order; padding patches form windows of their own (-1).
        self.patch_window = jnp.repeat(jnp.where(valid, key, -1)[self.order], unit)
        self.window_patches = cfg.window_patches

    def to_windows(self, x):
        """``[num_patches, ...]`` in processor order -> window order."""
        return x[self.patch_order]

    def from_windows(self, merged):
        """Merged units ``[num_patches / 4, ...]`` in window order -> processor order."""
        return merged[self.inverse]

    def attend(self, q, k, v):
        """Attention of ``[num_patches, heads, head_dim]`` (window order) within each window.

        A window is a contiguous run of at most W = ``window_patches`` patches, so the queries of
        each chunk of W find all their keys in that chunk and its two neighbours: the cost is
        ``3 * W`` keys per query, whatever the image sizes.
        """
        n, size = q.shape[0], self.window_patches
        chunks = -(-n // size)

        def split(x, fill):  # [n, ...] -> [chunks, W, ...]
            x = jnp.pad(x, [(0, chunks * size - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return x.reshape((chunks, size) + x.shape[1:])

        def with_neighbours(x, fill):  # [chunks, W, ...] -> [chunks, 3W, ...]
            edge = jnp.full_like(x[:1], fill)
            before, after = jnp.concatenate([edge, x[:-1]]), jnp.concatenate([x[1:], edge])
            return jnp.concatenate([before, x, after], axis=1)

        ids = split(self.patch_window, -1)
        # Padding patches (-1) attend to each other, so that no row is empty.
        mask = ids[:, :, None] == with_neighbours(ids, -1)[:, None, :]  # [chunks, W, 3W]
        keys, values = (with_neighbours(split(x, 0), 0) for x in (k, v))
        out = attention(split(q, 0), keys, values, mask[:, None])
        return out.reshape((chunks * size,) + out.shape[2:])[:n]


def swiglu(cfg: Qwen2_5VisionConfig, **kw) -> GatedMLP:
    return GatedMLP(cfg.embed_dim, cfg.intermediate_size, cfg.hidden_act, axes=("vision_embed", "vision_mlp"),
                    bias=True, **kw)  # fmt: skip


class Qwen2_5VisionTower(VisionTower):
    """Flattened patches -> one feature per merged 2x2 unit, in processor order."""

    def __init__(self, cfg: Qwen2_5VisionConfig, **kw):
        super().__init__(cfg, norm=rms_norm, mlp=swiglu, **kw)

    def __call__(self, pixel_values, grid_thw, max_patches_per_image: int, *, remat=None, scan_unroll: int = 1):
        x, layout, rotary = self.embed(pixel_values, grid_thw, max_patches_per_image)
        windows = WindowLayout(grid_thw, x.shape[0], self.cfg)
        x = windows.to_windows(x)
        cos, sin = (windows.to_windows(a) for a in rotary)
        # In window order each image still spans its own patch range: the per-image layout holds.
        full = np.isin(np.arange(self.cfg.depth), list(self.cfg.fullatt_block_indexes))

        def body(block, x, is_full):
            if full.all() or not full.any():  # one kind: no branch
                attend = layout.attend if full.all() else windows.attend
            else:
                def attend(q, k, v):
                    return jax.lax.cond(is_full, layout.attend, windows.attend, q, k, v)
            return block(x, cos, sin, attend), None

        x, _ = scan_layers(self.blocks, body, x, jnp.asarray(full), remat=remat, unroll=scan_unroll)
        return windows.from_windows(self.merger(x))
