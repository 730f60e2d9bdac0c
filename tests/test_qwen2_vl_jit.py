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


def _attention_work(grids, per_image: int, num_patches: int | None = None) -> dict:
    """What the tower's per-image attention runs for these images: the query rows it computes
    (valid query blocks x block rows) and the (query, key) scores per head."""
    from g2e_jax.models.qwen2_vl.vision import VisionLayout

    grids = np.asarray(grids)
    n = int(grids.prod(-1).sum()) if num_patches is None else num_patches
    layout = VisionLayout(jnp.asarray(grids), n, per_image, 2)
    blocks = int(np.asarray(layout.block_valid).sum())
    rows = blocks * layout.block
    return {"rows": rows, "scores": rows * per_image, "loop": layout.num_blocks}


def test_vision_attention_cost_grows_with_per_image_sizes():
    """Eight 64-patch images must cost far less attention than one 512-patch image (same total):
    each image's queries meet its own keys only."""
    many_small = _attention_work([[1, 8, 8]] * 8, 64)
    one_large = _attention_work([[1, 16, 32]], 512)
    report("vision attention scores", many_small=many_small["scores"], one_large=one_large["scores"])
    assert many_small["scores"] == 8 * 64**2
    assert one_large["scores"] == 512**2


def test_small_and_large_image_cost_their_own_rows():
    """A batch of one small and one large image computes the rows of those two, not of two large
    ones (the old [images, largest] layout ran 2 x 1024 query rows here)."""
    from g2e_jax.models.qwen2_vl import vision

    small, large = [1, 8, 8], [1, 32, 32]  # 64 and 1024 patches; the batch's largest is 1024
    mixed = _attention_work([small, large], 1024, num_patches=64 + 1024 + 128)  # bucketed stream
    report("small + large image attention", rows=mixed["rows"], scores=mixed["scores"])
    block = vision.VISION_QUERY_BLOCK
    assert mixed["rows"] == block + 1024  # one block for the small image, 1024 / block for the large
    assert mixed["rows"] < 2 * 1024
    # The static loop is bounded by the stream, not by images x largest.
    assert mixed["loop"] <= -(-(64 + 1024 + 128) // block) + 2


def test_vision_attention_memory_follows_one_block():
    """The compiled tower's temporaries grow with the patches, not with images x largest**2: a small
    image next to a 4,096-patch one adds about its own share, and four 4,096-patch images need less
    than one image's float32 score matrix of temporaries, and about four times what one image needs
    (issue 33: 8 photographs asked for 27 GB)."""
    from g2e_jax.models.qwen2_vl import VisionConfig
    from g2e_jax.models.qwen2_vl.vision import VisionTower

    cfg = VisionConfig(depth=1, embed_dim=32, num_heads=2, out_hidden_size=32, patch_size=2,
                       temporal_patch_size=1, in_channels=1)  # fmt: skip
    graphdef, state = nnx.split(VisionTower(cfg, rngs=nnx.Rngs(0)))
    large = 64 * 64  # a 64 x 64 patch grid

    def temp_bytes(sides) -> int:
        pixels = jax.ShapeDtypeStruct((sum(s * s for s in sides), cfg.patch_dim), jnp.float32)
        grid = jax.ShapeDtypeStruct((len(sides), 3), jnp.int32)
        fn = jax.jit(lambda s, p, g: nnx.merge(graphdef, s)(p, g, large))
        return int(fn.lower(state, pixels, grid).compile().memory_analysis().temp_size_in_bytes)

    one, small_and_large, four = temp_bytes([64]), temp_bytes([16, 64]), temp_bytes([64] * 4)
    scores_of_one_image = cfg.num_heads * large**2 * 4
    report("vision tower temporaries", one_image=one, small_and_large=small_and_large, four_images=four,
           one_score_matrix=scores_of_one_image)  # fmt: skip
    assert four < scores_of_one_image
    assert four <= 5 * one
    assert small_and_large <= 1.25 * one  # the small image's 256 patches: 1/16 of the large one's
