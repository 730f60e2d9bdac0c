"""LLaVA-NeXT image preprocessing (numpy + PIL) against transformers' ``LlavaNextImageProcessorPil``:
bit-identical tiles on odd sizes and aspect ratios that select every grid pinpoint, and the image token
count of the anyres packing against ``LlavaNextProcessor``'s."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from g2e_jax.models.llava_next import LlavaNextConfig, anyres, tiny_config  # noqa: E402
from g2e_jax.models.llava_next.hf_files import load_hf_processor, write_processor_files  # noqa: E402
from g2e_jax.models.llava_next.images import LlavaImageConfig, preprocess  # noqa: E402

# (height, width) -> the tiny pinpoint it selects (llava-v1.6's, scaled to 28-pixel tiles).
SIZES = {
    (37, 90): (28, 84),
    (61, 23): (84, 28),
    (50, 50): (56, 56),
    (13, 101): (28, 84),
    (99, 29): (84, 28),
    (28, 28): (28, 56),
    (45, 22): (56, 28),
    (5, 7): (28, 56),
    (300, 201): (56, 56),
    (200, 31): (84, 28),
}


@pytest.fixture(scope="module")
def tiny_processor_dir(tmp_path_factory):
    return write_processor_files(tmp_path_factory.mktemp("llava_proc"), tiny_config())


def _image(height, width, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def test_tiles_equal_transformers(tiny_processor_dir):
    hf = load_hf_processor(tiny_processor_dir).image_processor
    cfg = LlavaImageConfig.from_preprocessor_config(tiny_processor_dir)
    seen = set()
    for seed, ((h, w), pinpoint) in enumerate(SIZES.items()):
        mode = ("RGB", "RGBA", "L")[seed % 3]
        image = _image(h, w, seed, mode)
        assert anyres.select_best_resolution(h, w, cfg.image_grid_pinpoints) == pinpoint
        seen.add(pinpoint)
        ref = hf(image, return_tensors="np")
        ours, size = preprocess(image, cfg)
        assert ref["pixel_values"].shape[1:] == ours.shape, (h, w)
        np.testing.assert_array_equal(ours, ref["pixel_values"][0], err_msg=f"{h}x{w} {mode}")
        np.testing.assert_array_equal(size, ref["image_sizes"][0])
    assert seen == set(tiny_config().image_grid_pinpoints)  # every pinpoint selected at least once


def test_llava_v1_6_tile_size(tmp_path):
    """The real processor's 336-pixel tiles (llava-v1.6 pinpoints), on two odd sizes."""
    cfg = LlavaNextConfig()
    hf = load_hf_processor(write_processor_files(tmp_path, cfg)).image_processor
    ours_cfg = LlavaImageConfig.from_preprocessor_config(tmp_path)
    for seed, (h, w) in enumerate([(333, 1001), (517, 389)]):
        image = _image(h, w, seed)
        ours, _ = preprocess(image, ours_cfg)
        np.testing.assert_array_equal(ours, hf(image, return_tensors="np")["pixel_values"][0])


def test_image_token_count_equals_processor(tiny_processor_dir):
    processor = load_hf_processor(tiny_processor_dir)
    cfg = tiny_config()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for seed, (h, w) in enumerate(SIZES):
        batch = processor(text=["<image>"], images=[_image(h, w, seed)], return_tensors="np")
        assert int((batch["input_ids"] == image_id).sum()) == anyres.num_image_tokens(
            anyres.image_layout(h, w, cfg), cfg
        ), (h, w)
