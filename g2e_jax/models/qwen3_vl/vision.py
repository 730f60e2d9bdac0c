"""Qwen3-VL vision tower: its family's (Qwen2-VL's) parts (flattened-patch embedding, 2-D rotary, per-image
full attention in every block, LayerNorm blocks, the patch merger) with a patch embedding bias, a
GELU-tanh MLP of its own width, a learned square position table interpolated to each image's grid, and
DeepStack: the outputs of the blocks in ``deepstack_visual_indexes`` through mergers of their own (norm
over the merged window), returned with the main features for the decoder's first layers.

The blocks are one stack, run in segments by ``scan_layers`` (``start``/``length``): up to each DeepStack
tap, then the rest. The program holds the block body once per segment (len(taps) + 1, flat in depth) and
memory one residual stream, where a single scan would carry (and, under remat, save per block) a buffer
of every tap's features. The DeepStack mergers are a stack too, run by one scan over the taps' outputs.
Everything works on traced ``grid_thw`` under ``jit``, as Qwen2-VL's tower.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from g2e_jax.models.common.layers import embed, scan_layers, stack_layers
from g2e_jax.models.qwen2_vl.vision import PatchMerger, VisionLayout, VisionTower, layer_norm
from g2e_jax.models.qwen3_vl.config import Qwen3VisionConfig


def interpolated_positions(table, layout: VisionLayout, grid_thw, side: int):
    """Each patch's learned position: the ``side x side`` table bilinearly resampled to its image's
    (h, w) patch grid with the corners aligned (``F.interpolate(align_corners=True)``; transformers'
    interpolation indices and weights, computed in float32 as there)."""
    grid = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
    h, w = grid[layout.patch_image, 1], grid[layout.patch_image, 2]

    def taps(index, size):  # the two source rows (or columns) of each patch and their weights
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        offsets = jnp.arange(2, dtype=jnp.float32)
        tap = jnp.clip(floor.astype(jnp.int32)[:, None] + jnp.arange(2), 0, side - 1)
        weight = jnp.maximum(1 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0)
        return tap, weight

    h_tap, h_weight = taps(layout.hpos, h)
    w_tap, w_weight = taps(layout.wpos, w)
    index = (h_tap[:, :, None] * side + w_tap[:, None, :]).reshape(-1, 4)
    weight = (h_weight[:, :, None] * w_weight[:, None, :]).reshape(-1, 4)
    return (table[index].astype(jnp.float32) * weight[..., None]).sum(1)  # float32, as torch promotes


def merger(cfg, **kw) -> PatchMerger:
    return PatchMerger(cfg, norm=layer_norm, **kw)


class Qwen3VisionTower(VisionTower):
    """Flattened patches -> (one feature per merged 2x2 window ``[num_patches / 4, text hidden]``, the
    DeepStack features ``[len(taps), num_patches / 4, text hidden]`` or None without taps)."""

    def __init__(self, cfg: Qwen3VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(cfg, patch_bias=True, **kw)  # LayerNorm blocks, fc1/fc2 MLP (GELU-tanh), merger
        self.pos_embed = embed(cfg.num_position_embeddings, cfg.embed_dim, axes=("vision_positions", "vision_embed"),
                               **kw)  # fmt: skip
        taps = len(cfg.deepstack_visual_indexes)
        self.deepstack_mergers = (
            stack_layers(lambda r: merger(cfg, postshuffle=True, dtype=dtype, param_dtype=param_dtype, rngs=r),
                         taps, rngs) if taps else None
        )  # fmt: skip

    def __call__(self, pixel_values, grid_thw, max_patches_per_image: int, *, remat=None, scan_unroll: int = 1):
        """``remat`` / ``scan_unroll``: the block scans' (``scan_layers``)."""
        cfg = self.cfg
        x, layout, (cos, sin) = self.embed(pixel_values, grid_thw, max_patches_per_image)
        positions = interpolated_positions(self.pos_embed.embedding[...], layout, grid_thw, cfg.position_side)
        x = x + positions.astype(x.dtype)

        def body(block, x, _):
            return block(x, cos, sin, layout.attend), None

        tapped, start = [], 0
        for end in (*(i + 1 for i in cfg.deepstack_visual_indexes), cfg.depth):
            if end > start:
                x, _ = scan_layers(self.blocks, body, x, start=start, length=end - start, remat=remat,
                                   unroll=scan_unroll)  # fmt: skip
            tapped.append(x)
            start = end
        deepstack = None
        if self.deepstack_mergers is not None:
            _, deepstack = scan_layers(self.deepstack_mergers, lambda m, c, h: (c, m(h)), None,
                                       jnp.stack(tapped[:-1]), remat=remat)  # fmt: skip
        return self.merger(x), deepstack
