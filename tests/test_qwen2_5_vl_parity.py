"""Qwen2.5-VL against transformers' ``Qwen2_5_VLForConditionalGeneration`` on random weights, float32
(DESIGN.md §3): the Qwen2-VL cases, the windowed vision tower, jit with padded buckets, the Embedder.

The tiny model has 2 vision blocks, the first windowed (windows of 4x4 patches) and the second with
full attention; the test images' grids (4x4, 6x8, 10x6, 12x18 patches) mostly do not divide into
whole windows.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from conftest import assert_parity, real_token_diff, report  # noqa: E402
from hf_reference import (  # noqa: E402
    hf_hidden_states,
    hf_rope_index,
    load_hf_model,
    sequential_positions,
)
from test_qwen2_vl_jit import _forward, _pad  # noqa: E402
from test_qwen2_vl_parity import VISION, encode, prompt, random_image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.models.qwen2_5_vl import Qwen2_5VL, rope_index  # noqa: E402
from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor  # noqa: E402

ATOL = 1e-4
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models("qwen2_5_vl")


@pytest.fixture(scope="module")
def model(model_dir):
    loaded = models.load(model_dir, progress=False)  # dispatched on config.json's model_type
    assert isinstance(loaded, Qwen2_5VL)
    return loaded


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir):
    return load_hf_processor(model_dir)


def test_text_only(processor, hf_model, model):
    batch = encode(processor, [prompt("a cat"), prompt("Represent the given text in one word. " * 3)])
    positions = rope_index(batch["input_ids"], batch["attention_mask"], None, model.config, "mrope")
    real = batch["attention_mask"].astype(bool)  # padded slots never reach a real token
    np.testing.assert_array_equal(positions[:, real], hf_rope_index(hf_model, batch)[:, real])
    ref = hf_hidden_states(hf_model, batch, positions)
    assert_parity("Qwen2.5-VL text-only, right padding", ref, np.asarray(model(batch["input_ids"], batch["attention_mask"],
          position_ids=positions)), batch["attention_mask"])  # fmt: skip


def test_images_of_different_sizes_and_a_text_row(processor, hf_model, model):
    """Rows: one image; text only; two images of different sizes. Our positions are derived (M-RoPE)."""
    images = [random_image(56, 56, 1), random_image(84, 112, 2), random_image(140, 84, 3)]
    texts = [prompt(f"{VISION}first"), prompt("text only row"), prompt(f"two: {VISION} and {VISION} end")]
    batch = encode(processor, texts, images)
    mask = batch["attention_mask"]
    real = mask.astype(bool)
    hf_positions = hf_rope_index(hf_model, batch)
    ours = rope_index(batch["input_ids"], mask, batch["image_grid_thw"], model.config, "mrope")
    np.testing.assert_array_equal(ours[:, real], hf_positions[:, real])
    ref, ref_all = hf_hidden_states(hf_model, batch, hf_positions, output_hidden_states=True)
    out, out_all = model(batch["input_ids"], mask, batch["pixel_values"], batch["image_grid_thw"],
                         output_hidden_states=True)  # fmt: skip
    out = np.asarray(out)
    for row, case in enumerate(
        ["one image", "text-only row in an image batch", "two images of different sizes"]
    ):
        assert_parity(f"Qwen2.5-VL {case}", ref[row : row + 1], out[row : row + 1], mask[row : row + 1])
    layers = max(real_token_diff(r, o, mask) for r, o in zip(ref_all, out_all))
    report("Qwen2.5-VL every layer's hidden states (3 rows above)", max_abs_diff=layers)
    assert len(out_all) == len(ref_all) == model.config.text.num_hidden_layers + 1
    assert layers <= ATOL


def test_gen2embed_scheme(processor, hf_model, model):
    batch = encode(processor, [prompt("<|image_pad|>\nRepresent the given image."), prompt("plain text")],
                   [random_image(84, 112, 4)])  # fmt: skip
    positions = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], model.config,
                           "gen2embed")  # fmt: skip
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(positions[:, real], sequential_positions(batch["attention_mask"])[:, real])
    ref = hf_hidden_states(hf_model, batch, positions)
    out = _forward(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                   batch["image_grid_thw"], positions, 48)  # fmt: skip
    assert_parity("Qwen2.5-VL gen2embed scheme, bare image pads + text-only row (jit)", ref, np.asarray(out),
          batch["attention_mask"])  # fmt: skip


def test_vision_tower_alone_with_uneven_windows(processor, hf_model, model):
    images = [
        random_image(56, 56, 5),
        random_image(84, 112, 6),
        random_image(140, 84, 7),
        random_image(168, 252, 8),
    ]
    batch = encode(processor, [prompt(VISION)] * 4, images)
    grid = torch.as_tensor(batch["image_grid_thw"])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8], [1, 10, 6], [1, 12, 18]]
    with torch.no_grad():
        ref = hf_model.model.visual(
            torch.as_tensor(batch["pixel_values"]), grid_thw=grid
        ).pooler_output.numpy()
    features = nnx.jit(lambda m, p, g: m.image_features(p, g, max_patches_per_image=216))
    out = np.asarray(features(model, batch["pixel_values"], batch["image_grid_thw"]))
    diff = float(np.abs(ref - out).max())
    report("Qwen2.5-VL vision tower alone (jit), 4 images, uneven windows", max_abs_diff=diff,
           ref_max_abs=float(np.abs(ref).max()))  # fmt: skip
    assert out.shape == ref.shape
    assert diff <= ATOL


def test_jit_with_padded_buckets(processor, hf_model, model):
    """Traced grids, a static max_patches_per_image, padding rows, tokens, patches and images [0, 0, 0]."""
    images = [random_image(84, 112, 9), random_image(140, 84, 10)]
    batch = encode(processor, [prompt(f"{VISION}a"), prompt("text"), prompt(f"{VISION}b")], images)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    positions = hf_rope_index(hf_model, batch)
    ref = hf_hidden_states(hf_model, batch, positions)
    rows, length, patches = 4, ids.shape[1] + 9, batch["pixel_values"].shape[0] + 36
    out = _forward(model, _pad(ids, (rows, length)), _pad(mask, (rows, length)),
                   _pad(batch["pixel_values"], (patches, batch["pixel_values"].shape[1])), _pad(grid, (4, 3)),
                   _pad(positions, (3, rows, length), value=1), 64)  # fmt: skip
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert_parity("Qwen2.5-VL under jit, padded buckets", ref, out[: ids.shape[0], : ids.shape[1]], mask)
