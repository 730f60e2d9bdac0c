"""LLaVA-NeXT against transformers' ``LlavaNextForConditionalGeneration`` on random weights, float32
(DESIGN.md §3): text only, one image, several images of different sizes and tile grids in one batch,
the vision features alone, padded buckets under jit, and a save -> transformers round trip.

The tiny model: 3 CLIP layers on 28-pixel tiles of 4x4 patches (features of the second-to-last layer),
llava-v1.6's pinpoints scaled to 28-pixel tiles, a 2-layer Mistral decoder with GQA.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from conftest import assert_parity, report  # noqa: E402
from hf_reference import load_hf_model  # noqa: E402
from PIL import Image  # noqa: E402

from g2e_jax import models  # noqa: E402
from g2e_jax.models.llava_next import LlavaNext, anyres  # noqa: E402
from g2e_jax.models.llava_next.hf_files import load_hf_processor  # noqa: E402

ATOL = 1e-4


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def inst(text: str) -> str:
    return f"[INST] {text} [/INST]"


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models("llava_next")


@pytest.fixture(scope="module")
def model(model_dir):
    loaded = models.load(model_dir, progress=False)  # dispatched on config.json's model_type
    assert isinstance(loaded, LlavaNext)
    return loaded


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir):
    return load_hf_processor(model_dir)


def encode(processor, texts, images=None):
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="np")
    return {k: np.asarray(v) for k, v in batch.items()}


def hf_hidden(hf_model, batch):
    with torch.no_grad():
        return hf_model.model(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()


def our_hidden(model, batch):
    """Our final hidden states for a processor batch with images (the eager call, as transformers')."""
    return np.asarray(
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            image_sizes=batch["image_sizes"],
        )
    )


def test_one_image(processor, hf_model, model):
    batch = encode(processor, [inst("<image>\nWhat is this?")], [random_image(37, 90, 1)])
    out = our_hidden(model, batch)
    assert_parity(
        "LLaVA-NeXT one image (37x90, 1x3 tiles)", hf_hidden(hf_model, batch), out, batch["attention_mask"]
    )


def test_images_of_different_sizes_and_grids(processor, hf_model, model):
    """Rows: two images (3x1 and 2x2 tile grids); text only; one image (2x1). Every pinpoint but one
    appears, and the unpadding crops rows in some images and columns in others."""
    images = [random_image(61, 23, 2), random_image(50, 50, 3), random_image(45, 22, 4)]
    grids = [anyres.tile_grid(im.height, im.width, model.config) for im in images]
    assert grids == [(3, 1), (2, 2), (2, 1)]
    texts = [inst("<image> and <image> differ"), inst("text only row"), inst("<image>\nlast")]
    batch = encode(processor, texts, images)
    out = our_hidden(model, batch)
    ref = hf_hidden(hf_model, batch)
    mask = batch["attention_mask"]
    for row, case in enumerate(
        ["two images (3x1, 2x2 tiles)", "text-only row in an image batch", "one image (2x1)"]
    ):
        assert_parity(f"LLaVA-NeXT {case}", ref[row : row + 1], out[row : row + 1], mask[row : row + 1])


def test_image_features_alone(processor, hf_model, model):
    """CLIP tower + projector + anyres packing (unpadding, image_newline) against ``get_image_features``."""
    images = [random_image(13, 101, 5), random_image(99, 29, 6), random_image(57, 57, 7)]
    batch = encode(processor, [inst("<image>")] * 3, images)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(
            torch.as_tensor(batch["pixel_values"]), torch.as_tensor(batch["image_sizes"])
        ).pooler_output
    ref = torch.cat(list(ref)).numpy()
    layout = anyres.layouts(batch["image_sizes"], model.config)
    n = anyres.num_image_tokens(layout, model.config)
    out = np.asarray(model.image_features(_tiles(batch, model.config), layout, np.arange(n)))
    diff = float(np.abs(ref - out).max())
    report(
        "LLaVA-NeXT image features alone, 3 images", max_abs_diff=diff, ref_max_abs=float(np.abs(ref).max())
    )
    assert out.shape == ref.shape
    assert diff <= ATOL


def _tiles(batch, cfg):
    """The processor's per-image padded tiles, concatenated."""
    sizes = batch["image_sizes"].tolist()
    return np.concatenate(
        [pv[: anyres.num_tiles(h, w, cfg)] for pv, (h, w) in zip(batch["pixel_values"], sizes)]
    )


@nnx.jit
def _forward(model, input_ids, attention_mask, pixel_values, position_ids, layout):
    return model(input_ids, attention_mask, pixel_values, layout, position_ids)


def _pad(array, shape, value=0):
    out = np.full(shape, value, dtype=np.asarray(array).dtype)
    out[tuple(slice(0, s) for s in np.shape(array))] = array
    return out


def test_jit_with_padded_buckets(processor, hf_model, model):
    """Traced layouts and positions; padding rows, tokens, tiles and images (layout [0, 0, 0])."""
    images = [random_image(37, 90, 8), random_image(50, 50, 9)]
    batch = encode(processor, [inst("<image>a"), inst("text"), inst("<image>b")], images)
    ref = hf_hidden(hf_model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tiles = _tiles(batch, model.config).reshape(-1, 3 * 28 * 28)  # flattened rows, as the Embedder packs them
    layout = anyres.layouts(batch["image_sizes"], model.config)
    rows, length = 4, ids.shape[1] + 9
    positions = np.broadcast_to(np.arange(length), (rows, length))
    out = _forward(
        model,
        _pad(ids, (rows, length)),
        _pad(mask, (rows, length)),
        _pad(tiles, (tiles.shape[0] + 3,) + tiles.shape[1:]),
        positions,
        _pad(layout, (4, 3)),
    )
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert_parity("LLaVA-NeXT under jit, padded buckets", ref, out[: ids.shape[0], : ids.shape[1]], mask)


def test_every_transformers_name_maps(hf_model, model):
    """transformers 5's in-memory names and the llava-hf hub's (``vision_tower.vision_model.*``) all map to
    our parameters, and our names map back to the in-memory ones for PEFT."""
    from g2e_jax.adapters.peft import _hf_module
    from g2e_jax.models.llava_next import NAME_MAP

    ours = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    names = [n for n in hf_model.state_dict() if not n.endswith("position_ids")]
    assert {NAME_MAP.to_nnx(n)[0] for n in names} == ours
    hub = [
        n.replace("model.vision_tower.", "vision_tower.vision_model.") for n in names if "vision_tower" in n
    ]
    assert all(NAME_MAP.to_nnx(n) is not None for n in hub)
    modules = dict(hf_model.named_modules())
    for path in (
        "text.layers.0.attn.q_proj",
        "vision_tower.layers.1.mlp.fc1",
        "multi_modal_projector.linear_2",
    ):
        assert _hf_module(NAME_MAP, path) in modules
