"""The backbone under jit with fixed shape buckets, and the cost of per-image vision attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import real_token_diff, report
from g2e_jax.models.qwen2_vl import rope_index


def _pad(array, shape, value=0):
    out = np.full(shape, value, dtype=np.asarray(array).dtype)
    out[tuple(slice(0, s) for s in np.shape(array))] = array
    return out


@nnx.jit(static_argnames="max_patches_per_image")
def _forward(
    model, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, max_patches_per_image
):
    return model(
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        position_ids,
        max_patches_per_image=max_patches_per_image,
    )


def _batch(cfg, seed):
    """Two rows with images of different sizes and a text-only row, built without a processor."""
    rng = np.random.default_rng(seed)
    grids = np.array([[1, 4, 6], [1, 8, 4], [1, 6, 6]])
    tokens = [int(g.prod()) // 4 for g in grids]
    img = cfg.image_token_id

    def text(n):
        return list(rng.integers(0, 900, n))

    rows = [
        text(5) + [img] * tokens[0] + text(7),
        text(11),
        text(3) + [img] * tokens[1] + text(2) + [img] * tokens[2],
    ]
    length = max(map(len, rows))
    ids = np.stack([_pad(np.array(r), (length,), 0) for r in rows])
    mask = np.stack([_pad(np.ones(len(r), np.int32), (length,)) for r in rows])
    pixels = rng.standard_normal((int(grids.prod(-1).sum()), cfg.vision.patch_dim), dtype=np.float32)
    return ids, mask, pixels, grids


@pytest.mark.parametrize("scheme", ["mrope", "gen2embed"])
def test_padding_to_buckets_under_jit_leaves_real_positions_unchanged(jax_model, scheme):
    cfg = jax_model.config
    ids, mask, pixels, grids = _batch(cfg, seed=0)
    positions = rope_index(ids, mask, grids, cfg, scheme)
    ref = np.asarray(jax_model(ids, mask, pixels, grids, position_ids=positions))

    batch, length, patches, images, per_image = 4, 96, 256, 4, 64  # buckets
    out = _forward(
        jax_model,
        _pad(ids, (batch, length)),
        _pad(mask, (batch, length)),
        _pad(pixels, (patches, pixels.shape[1])),
        _pad(grids, (images, 3)),  # padding images have grid [0, 0, 0]
        _pad(positions, (3, batch, length), value=1),
        per_image,
    )
    out = np.asarray(out)
    assert out.shape == (batch, length, cfg.text.hidden_size)
    assert np.isfinite(out).all()
    diff = real_token_diff(ref, out[: ids.shape[0], : ids.shape[1]], mask)
    report(f"jit + padded buckets vs unpadded ({scheme})", max_abs_diff=diff)
    assert diff <= 1e-5


def test_same_bucket_does_not_recompile(jax_model):
    cfg = jax_model.config
    shapes = dict(batch=4, length=96, patches=256, images=4)

    def padded(seed):
        ids, mask, pixels, grids = _batch(cfg, seed)
        positions = rope_index(ids, mask, grids, cfg, "gen2embed")
        b, n, p, i = shapes["batch"], shapes["length"], shapes["patches"], shapes["images"]
        return (
            _pad(ids, (b, n)),
            _pad(mask, (b, n)),
            _pad(pixels, (p, pixels.shape[1])),
            _pad(grids, (i, 3)),
            _pad(positions, (3, b, n), value=1),
        )

    graphdef, state = nnx.split(jax_model)
    traces = []

    @jax.jit
    def fn(state, *inputs):
        traces.append(1)  # runs only while tracing
        return nnx.merge(graphdef, state)(*inputs, max_patches_per_image=64)

    fn(state, *padded(1)).block_until_ready()
    fn(state, *padded(2)).block_until_ready()
    assert len(traces) == 1


def test_vision_attention_cost_grows_with_per_image_sizes(jax_model):
    """Eight 64-patch images must cost far less attention than one 512-patch image (same total)."""
    vcfg = jax_model.config.vision
    graphdef, state = nnx.split(jax_model.visual)

    def flops(grids, per_image):
        grids = np.array(grids)
        pixels = jax.ShapeDtypeStruct((int(grids.prod(-1).sum()), vcfg.patch_dim), jnp.float32)
        fn = jax.jit(lambda s, p, g: nnx.merge(graphdef, s)(p, g, per_image))
        cost = fn.lower(state, pixels, jnp.asarray(grids)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    many_small = flops([[1, 8, 8]] * 8, 64)
    one_large = flops([[1, 16, 32]], 512)
    # QK^T and PV over all heads: 2 matmuls x 2 flops x embed_dim per (query, key) pair, per block.
    predicted_gap = vcfg.depth * 2 * 2 * vcfg.embed_dim * (512**2 - 8 * 64**2)
    report(
        "vision attention flops",
        many_small=many_small,
        one_large=one_large,
        predicted_gap=float(predicted_gap),
    )
    assert one_large - many_small >= 0.9 * predicted_gap
