"""Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Patches arrive flattened and concatenated over images, as the HF processor emits them
(``[num_patches, C*T*P*P]``, each image's patches grouped in 2x2 merge windows), and stay in that
packed stream through every block: norms and MLPs cost the real patches (plus the stream's bucket).
Attention never crosses images. With XLA's attention (CPU, TPU, float32) it runs over query blocks:
each image's patches in runs of ``VISION_QUERY_BLOCK``, one block at a time against its own image's
keys, so memory holds one block's scores and a small image next to a large one costs its own rows,
not the large one's (issue 33: eight photographs asked for 27 GB as padded per-image squares). With a
fused kernel (cuDNN, half precision on GPU), which holds no scores, it runs on an ``[images,
max_patches_per_image]`` gather in one call. Everything below works on traced ``grid_thw`` under
``jit``; only ``max_patches_per_image`` must be static.

Qwen2.5-VL's tower (``g2e_jax.models.qwen2_5_vl.vision``) is built from these parts: the blocks and
the merger take their norm and MLP as factories, and attention takes the grouping it runs within.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.models.qwen2_vl.config import VisionConfig
from g2e_jax.models.common.layers import (
    RMSNorm,
    activation,
    apply_rotary,
    attention,
    attention_implementation,
    linear,
    map_rows,
    scan_layers,
    stack_layers,
)
from g2e_jax.models.common.layers import layer_norm as common_layer_norm


VISION_QUERY_BLOCK = 256  # query rows per block of the per-image attention (XLA): 2B-width tower 1.4x faster than one call


class VisionLayout:
    """Where each patch sits (its image, its index inside the image, its (h, w) grid cell), and the
    query blocks of attention within images."""

    def __init__(self, grid_thw, num_patches: int, max_patches_per_image: int, merge: int):
        grid_thw = jnp.asarray(grid_thw, jnp.int32).reshape(-1, 3)
        images = grid_thw.shape[0]
        sizes = grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]
        ends = jnp.cumsum(sizes)
        self.starts = ends - sizes
        self.sizes = sizes
        p = jnp.arange(num_patches, dtype=jnp.int32)
        image = jnp.minimum(jnp.searchsorted(ends, p, side="right"), images - 1).astype(jnp.int32)
        self.patch_valid = p < ends[-1]
        local = jnp.where(self.patch_valid, p - self.starts[image], 0)
        self.patch_image, self.patch_local = image, local
        # Within one frame the processor orders patches as (h/m, w/m, m, m).
        w = grid_thw[image, 2]
        in_frame = local % jnp.maximum(grid_thw[image, 1] * w, 1)
        block, within = in_frame // (merge * merge), in_frame % (merge * merge)
        blocks_per_row = jnp.maximum(w // merge, 1)
        self.hpos = (block // blocks_per_row) * merge + within // merge
        self.wpos = (block % blocks_per_row) * merge + within % merge
        self.max_patches_per_image = max_patches_per_image
        # Query blocks: image i's patches in ceil(size_i / C) runs of C. Their number is at most
        # ceil(num_patches / C) + images (static); blocks past the real ones are skipped.
        c = self.block = min(VISION_QUERY_BLOCK, max_patches_per_image)
        per_image = -(-sizes // c)
        block_ends = jnp.cumsum(per_image)
        block_first = block_ends - per_image
        self.num_blocks = min(-(-num_patches // c) + images, images * -(-max_patches_per_image // c))
        b = jnp.arange(self.num_blocks, dtype=jnp.int32)
        owner = jnp.minimum(jnp.searchsorted(block_ends, b, side="right"), images - 1).astype(jnp.int32)
        self.block_valid = b < block_ends[-1]
        self.block_query = self.starts[owner] + (b - block_first[owner]) * c  # first query row
        self.block_keys, self.block_size = self.starts[owner], sizes[owner]  # its image's keys
        self.patch_block = jnp.where(self.patch_valid, block_first[image] + local // c, 0)
        self.patch_row = local % c

    def attend(self, q, k, v):
        """Attention of ``[num_patches, heads, head_dim]`` within each image."""
        if attention_implementation(q.dtype) is not None:  # a fused kernel: no scores held
            return self._attend_images(q, k, v)
        return self._attend_blocks(q, k, v)

    def _attend_blocks(self, q, k, v):
        """One query block at a time against the first ``max_patches_per_image`` keys from its
        image's start (those past the image masked): ``[heads, block, max_patches_per_image]``
        scores alive, whatever the batch."""
        n, heads, dim = q.shape
        c, s = self.block, self.max_patches_per_image
        # Padded so that every slice is in range (dynamic_slice would shift a slice that is not).
        q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x, pad in ((q, c), (k, s), (v, s)))

        def one(xs):
            first, keys, size, valid = xs

            def run():
                qb = jax.lax.dynamic_slice_in_dim(q, first, c)[None]
                kb, vb = (jax.lax.dynamic_slice_in_dim(x, keys, s)[None] for x in (k, v))
                return attention(qb, kb, vb, kv_lengths=size[None])[0]

            return jax.lax.cond(valid, run, lambda: jnp.zeros((c, heads, dim), q.dtype))

        out = jax.lax.map(one, (self.block_query, self.block_keys, self.block_size, self.block_valid))
        out = out[self.patch_block, self.patch_row]  # [num_patches, heads, head_dim]
        return jnp.where(self.patch_valid[:, None, None], out, 0)

    def _attend_images(self, q, k, v):
        """On an ``[images, max_patches_per_image]`` gather, in one call."""
        q, k, v = self.to_images(q), self.to_images(k), self.to_images(v)  # [I, S, H, D]
        # Keys of the same image: its first `size` slots (at least one, so that empty padding
        # images stay finite; their output is dropped).
        return self.to_patches(attention(q, k, v, kv_lengths=jnp.maximum(self.sizes, 1)))

    def to_images(self, x):
        """``[num_patches, ...]`` -> ``[images, S, ...]`` (invalid slots zeroed)."""
        s = jnp.arange(self.max_patches_per_image, dtype=jnp.int32)
        valid = s[None, :] < self.sizes[:, None]
        out = x[jnp.where(valid, self.starts[:, None] + s[None, :], 0)]
        return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), out, 0)

    def to_patches(self, y):
        """``[images, S, ...]`` -> ``[num_patches, ...]`` (padding patches zeroed)."""
        out = y[self.patch_image, jnp.minimum(self.patch_local, self.max_patches_per_image - 1)]
        return jnp.where(self.patch_valid.reshape(self.patch_valid.shape + (1,) * (out.ndim - 1)), out, 0)


class VisionRotary(nnx.Module):
    """2-D rotary angles: the first half of the frequencies rotate by row, the second by column."""

    def __init__(self, cfg: VisionConfig):
        self.dim, self.theta = cfg.head_dim // 2, cfg.rope_theta

    def __call__(self, hpos, wpos):
        inv_freq = 1.0 / (self.theta ** (jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim))
        freqs = jnp.concatenate(
            [hpos[:, None].astype(jnp.float32) * inv_freq, wpos[:, None].astype(jnp.float32) * inv_freq],
            axis=-1,
        )
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        kw["bias"] = True
        self.qkv = linear(cfg.embed_dim, 3 * cfg.embed_dim, axes=("vision_embed", "vision_heads"), **kw)
        self.proj = linear(cfg.embed_dim, cfg.embed_dim, axes=("vision_heads", "vision_embed"), **kw)

    def __call__(self, x, cos, sin, attend):
        """``attend(q, k, v)`` runs attention within the groups it knows (images, or windows)."""
        n = x.shape[0]
        q, k, v = jnp.split(self.qkv(x).reshape(n, 3, self.num_heads, -1), 3, axis=1)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        # Rotary in float32 (as transformers does for the vision tower).
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        return self.proj(attend(q, k, v).reshape(n, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.embed_dim, cfg.mlp_dim, axes=("vision_embed", "vision_mlp"), bias=True, **kw)
        self.fc2 = linear(cfg.mlp_dim, cfg.embed_dim, axes=("vision_mlp", "vision_embed"), bias=True, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return map_rows(lambda h: self.fc2(self.act(self.fc1(h))), x, self.fc1.out_features, self)


def layer_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    return common_layer_norm(dim, 1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def rms_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    return RMSNorm(dim, 1e-6, param_dtype=param_dtype)


class VisionBlock(nnx.Module):
    """Pre-norm attention + MLP; ``norm(dim, **kw)`` and ``mlp(cfg, **kw)`` build the parts."""

    def __init__(self, cfg, *, norm, mlp, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = norm(cfg.embed_dim, **kw)
        self.norm2 = norm(cfg.embed_dim, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = mlp(cfg, **kw)

    def __call__(self, x, cos, sin, attend):
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then each 2x2 window of neighbouring patches (contiguous in the input) -> one token.

    ``postshuffle`` (Qwen3-VL's DeepStack mergers): the norm runs over the merged window (4x the width)
    instead of over each patch."""

    def __init__(self, cfg, *, norm, postshuffle: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        merged = cfg.embed_dim * self.window
        self.ln_q = norm(merged if postshuffle else cfg.embed_dim, **kw)
        self.fc1 = linear(merged, merged, axes=("merge", "vision_embed"), bias=True, **kw)
        self.fc2 = linear(merged, cfg.out_hidden_size, axes=("merge", "embed"), bias=True, **kw)

    def __call__(self, x):
        merged = self.window * x.shape[-1]
        x = self.ln_q(x.reshape(-1, merged)) if self.postshuffle else self.ln_q(x).reshape(-1, merged)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """Flattened patches -> one feature per merged 2x2 window (``[num_patches / 4, text hidden]``).

    Qwen2-VL's parts by default (LayerNorm, fc1/fc2 MLP, a patch embedding without bias); other towers
    pass their own."""

    def __init__(self, cfg, *, norm=layer_norm, mlp=VisionMLP, patch_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.patch_embed = linear(
            cfg.patch_dim, cfg.embed_dim, axes=("patch", "vision_embed"), bias=patch_bias, **kw
        )
        self.rotary = VisionRotary(cfg)
        self.blocks = stack_layers(
            lambda r: VisionBlock(cfg, norm=norm, mlp=mlp, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth, rngs
        )  # one stacked module: parameters [depth, ...], run by ``scan_layers``
        self.merger = PatchMerger(cfg, norm=norm, **kw)

    def embed(self, pixel_values, grid_thw, max_patches_per_image: int):
        """Patch embeddings, their layout, and the rotary (cos, sin) of every patch."""
        num_patches = pixel_values.shape[0]
        window = self.cfg.spatial_merge_size**2
        if num_patches % window:
            raise ValueError(
                f"pixel_values has {num_patches} patches, not a multiple of the merge window {window}"
            )
        layout = VisionLayout(grid_thw, num_patches, max_patches_per_image, self.cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel.dtype))
        return x, layout, self.rotary(layout.hpos, layout.wpos)

    def __call__(self, pixel_values, grid_thw, max_patches_per_image: int, *, remat=None, scan_unroll: int = 1):
        """``remat`` / ``scan_unroll``: the block scan's (``scan_layers``)."""
        x, layout, (cos, sin) = self.embed(pixel_values, grid_thw, max_patches_per_image)
        x, _ = scan_layers(self.blocks, lambda m, x, _: (m(x, cos, sin, layout.attend), None), x,
                           remat=remat, unroll=scan_unroll)  # fmt: skip
        return self.merger(x)
