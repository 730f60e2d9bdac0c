"""CLIP's vision transformer (``CLIPVisionModel``) as LLaVA-NeXT uses it: tiles of ``image_size`` pixels,
a CLS token, learned positions, pre-norm blocks; only the layers up to ``vision_feature_layer`` run."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from g2e_jax.models.llava_next.config import ClipVisionConfig
from g2e_jax.models.common.layers import (
    activation,
    attention,
    embed,
    linear,
    map_rows,
    param,
    scan_layers,
    stack_layers,
)
from g2e_jax.models.common.layers import layer_norm as common_layer_norm


class ClipEmbeddings(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        # The stride-P conv as a Linear over flattened (C, P, P) patches (FLATTEN_CONV in the name map).
        self.patch_embedding = linear(
            cfg.in_channels * cfg.patch_size**2,
            cfg.embed_dim,
            axes=("patch", "vision_embed"),
            bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.class_embedding = param(jnp.zeros((cfg.embed_dim,), param_dtype), ("vision_embed",))
        self.position_embedding = embed(
            cfg.num_positions, cfg.embed_dim, axes=("vision_positions", "vision_embed"), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, pixel_values):
        """``[T, C, S, S]`` -> ``[T, 1 + (S/P)**2, D]``."""
        c, g, p = self.cfg.in_channels, self.cfg.grid, self.cfg.patch_size
        t = pixel_values.shape[0]
        x = pixel_values.reshape(t, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(t, g * g, c * p * p)
        x = self.patch_embedding(x)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (t, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class ClipAttention(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = (
            linear(cfg.embed_dim, cfg.embed_dim, axes=("vision_embed", "vision_heads"), **kw)
            for _ in range(3)
        )
        self.out_proj = linear(cfg.embed_dim, cfg.embed_dim, axes=("vision_heads", "vision_embed"), **kw)

    def __call__(self, x):
        t, length, _ = x.shape
        q, k, v = (
            proj(x).reshape(t, length, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(attention(q, k, v).reshape(t, length, -1))


class ClipMLP(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.embed_dim, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.embed_dim, axes=("vision_mlp", "vision_embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return map_rows(lambda h: self.fc2(self.act(self.fc1(h))), x, self.fc1.out_features, self)


def layer_norm(cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return common_layer_norm(
        cfg.embed_dim, cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class ClipLayer(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, **kw):
        self.layer_norm1 = layer_norm(cfg, **kw)
        self.self_attn = ClipAttention(cfg, **kw)
        self.layer_norm2 = layer_norm(cfg, **kw)
        self.mlp = ClipMLP(cfg, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nnx.Module):
    """Tiles ``[T, C, S, S]`` -> hidden state ``num_layers`` (0: the pre-normed embeddings) ``[T, 1 + n, D]``.

    ``post_layernorm`` and the layers after ``num_layers`` are held (the checkpoint has them) but unused,
    as in LLaVA-NeXT, which reads a hidden state rather than CLIP's output."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = ClipEmbeddings(cfg, **kw)
        self.pre_layrnorm = layer_norm(cfg, **kw)  # sic: transformers' name
        # Every layer of the checkpoint, stacked (load -> save keeps them); the first num_layers run.
        self.layers = stack_layers(lambda r: ClipLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth, rngs)
        self.post_layernorm = layer_norm(cfg, **kw)

    def __call__(self, pixel_values, num_layers: int, *, remat=None, scan_unroll: int = 1):
        """``remat`` / ``scan_unroll``: the layer scan's (``scan_layers``), over the first ``num_layers``
        layers of the stack."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        if num_layers:
            x, _ = scan_layers(self.layers, lambda m, x, _: (m(x), None), x, remat=remat, unroll=scan_unroll,
                               length=num_layers)  # fmt: skip
        return x
