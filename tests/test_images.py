"""Host image preprocessing: bit-parity with transformers' Qwen2-VL processor, pre-resizes, load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from g2e_jax.data.images import RESOLUTIONS, ImageError, load_image, resize_for_resolution
from g2e_jax.models.qwen2_vl.images import ImageConfig, num_image_tokens, preprocess, smart_resize

SMALL = (28 * 28 * 4, 28 * 28 * 64)  # the tiny test model's bounds: exercises the max_pixels branch cheaply
REAL = (56 * 56, 28 * 28 * 1280)  # Qwen2-VL's processor defaults
SIZES = [(57, 91), (200, 33), (333, 444), (29, 1000), (1, 1), (150, 1), (28, 28), (1000, 5)]  # (W, H)


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _odd_modes() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), mode="RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (61, 33), dtype=np.uint8), mode="L")
    gray_alpha = Image.fromarray(rng.integers(0, 256, (40, 50, 2), dtype=np.uint8), mode="LA")
    palette = _rgb(64, 48, seed=2).quantize(16)
    palette.info["transparency"] = 3  # transparency via info, not an alpha band
    return {"RGBA": rgba, "L": gray, "LA": gray_alpha, "P+transparency": palette}


@pytest.fixture(scope="module")
def hf_processors():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return {b: Qwen2VLImageProcessorPil(min_pixels=b[0], max_pixels=b[1]) for b in (SMALL, REAL)}


def _hf(proc, img):
    out = proc([img], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def _assert_parity(ours, theirs) -> float:
    (p, g), (hp, hg) = ours, theirs
    np.testing.assert_array_equal(g, hg)
    assert g.dtype == np.int64 and p.dtype == np.float32 and p.shape == hp.shape
    np.testing.assert_allclose(p, hp, rtol=0, atol=1e-6)
    return float(np.abs(p - hp).max())


@pytest.mark.parametrize("bounds", [SMALL, REAL], ids=["small", "real"])
def test_parity_random_rgb(hf_processors, bounds):
    cfg = ImageConfig(min_pixels=bounds[0], max_pixels=bounds[1])
    worst = 0.0
    for i, (w, h) in enumerate(SIZES):
        img = _rgb(w, h, seed=i)
        worst = max(worst, _assert_parity(preprocess(img, cfg), _hf(hf_processors[bounds], img)))
    print(f"\n[parity] images vs Qwen2VLImageProcessorPil {bounds}: max_abs_diff={worst:.3e}")


@pytest.mark.parametrize("bounds", [SMALL, REAL], ids=["small", "real"])
def test_parity_non_rgb_modes(hf_processors, bounds):
    cfg = ImageConfig(min_pixels=bounds[0], max_pixels=bounds[1])
    for mode, img in _odd_modes().items():
        _assert_parity(preprocess(img, cfg, source=mode), _hf(hf_processors[bounds], img))


def test_parity_from_path_and_pre_resize(hf_processors, tmp_path):
    img = _rgb(90, 40, seed=7)
    path = tmp_path / "img.png"
    img.save(path)
    proc = hf_processors[REAL]
    _assert_parity(preprocess(path, ImageConfig()), _hf(proc, Image.open(path)))
    # The reference pre-resizes the PIL image, then hands it to the HF processor.
    squared = ImageConfig(resolution="mid_low")
    _assert_parity(preprocess(str(path), squared), _hf(proc, img.resize((448, 448))))
    adaptive = ImageConfig(resolution="random")
    _assert_parity(preprocess(img, adaptive), _hf(proc, img.resize((672, 336), Image.Resampling.LANCZOS)))


def test_patch_layout_and_token_count():
    # A ramp image makes the row order checkable without the HF processor.
    cfg = ImageConfig(min_pixels=56 * 56, max_pixels=56 * 84, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    arr = np.zeros((56, 84, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(84)[None, :]  # R = x
    arr[..., 1] = np.arange(56)[:, None]  # G = y
    patches, grid = preprocess(Image.fromarray(arr), cfg)
    np.testing.assert_array_equal(grid, [1, 4, 6])
    assert patches.shape == (24, 3 * 2 * 14 * 14) and patches.flags.c_contiguous
    px = patches.reshape(24, 3, 2, 14, 14) * 255
    np.testing.assert_array_equal(px[:, :, 0], px[:, :, 1])  # temporal copies
    # Row r: merge block (r // 4) in row-major over a 2x3 block grid, then (r % 4) row-major within the block.
    for r in range(24):
        block, inner = divmod(r, 4)
        y0 = (block // 3 * 2 + inner // 2) * 14
        x0 = (block % 3 * 2 + inner % 2) * 14
        assert round(px[r, 0, 0, 0, 0]) == x0 and round(px[r, 1, 0, 0, 0]) == y0, r
    assert num_image_tokens(grid, 2) == 6
    with pytest.raises(ValueError, match="merge_size"):
        num_image_tokens([1, 3, 4], 2)


def test_smart_resize_bounds():
    assert smart_resize(1, 1, 28, *REAL) == (56, 56)
    h, w = smart_resize(4000, 3000, 28, *REAL)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= REAL[1]
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 28, *REAL)


# ---- Pre-resize modes ----


@pytest.mark.parametrize(
    ("name", "side"),
    [("low", 128), ("clip", 336), ("mid_low", 448), ("mid", 672), ("mid_high", 768), ("high", 1344)],
)
def test_square_resolutions(name, side):
    img = _rgb(30, 20)
    out = resize_for_resolution(img, name)
    assert out.size == (side, side)
    # Pillow's default filter (bicubic), as the reference calls resize() without one.
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((side, side), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((100, 1000), (496, 992)),  # stretch W to 500, then 992/1000 -> int(496.0), int(992.0)
        ((1000, 100), (992, 496)),
        ((50, 60), (336, 403)),  # grow: 336/50 = 6.72 -> int(336.0), int(403.2)
        ((500, 700), (500, 700)),  # within [336, 992]: scale 1.0
        ((1200, 1000), (992, 826)),  # shrink: 992/1200 -> int(826.66)
        ((300, 500), (336, 560)),  # ratio <= 2: no stretch; 336/300 -> int(336.00000000000006), int(560.0)
        ((7, 30), (336, 672)),  # stretch W to 15.0, then grow by 336/15 = 22.4
    ],
)
def test_random_resolution(size, expected):
    out = resize_for_resolution(_rgb(*size), "random")
    assert out.size == expected
    assert np.array_equal(
        np.asarray(out), np.asarray(_rgb(*size).resize(expected, Image.Resampling.LANCZOS))
    ), "LANCZOS filter"


def test_resolution_none_and_unknown():
    img = _rgb(10, 20)
    assert resize_for_resolution(img, None) is img
    with pytest.raises(ValueError, match="valid: None, low, clip"):
        resize_for_resolution(img, "ultra")
    with pytest.raises(ValueError, match="ultra"):
        ImageConfig(resolution="ultra")
    assert set(RESOLUTIONS) == {"low", "clip", "mid_low", "mid", "mid_high", "high", "random"}


# ---- Config ----


def test_from_preprocessor_config(tmp_path):
    base = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "resample": 3,
        "image_mean": [0.5] * 3,
    }
    new = tmp_path / "new"
    new.mkdir()
    (new / "preprocessor_config.json").write_text(
        json.dumps({**base, "size": {"shortest_edge": 100, "longest_edge": 900}})
    )
    cfg = ImageConfig.from_preprocessor_config(new, resolution="clip")
    assert (cfg.min_pixels, cfg.max_pixels, cfg.resolution) == (100, 900, "clip")
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == ImageConfig().image_std
    assert hash(cfg) is not None

    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({**base, "min_pixels": 3136, "max_pixels": 12845056}))
    cfg = ImageConfig.from_preprocessor_config(legacy)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)

    both = tmp_path / "both.json"  # as HF: the legacy keys win over `size`
    both.write_text(
        json.dumps(
            {**base, "min_pixels": 1, "max_pixels": 2, "size": {"shortest_edge": 3, "longest_edge": 4}}
        )
    )
    cfg = ImageConfig.from_preprocessor_config(both)
    assert (cfg.min_pixels, cfg.max_pixels) == (1, 2)

    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert ImageConfig.from_preprocessor_config(empty) == ImageConfig()

    off = tmp_path / "off.json"
    off.write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize"):
        ImageConfig.from_preprocessor_config(off)


def test_from_tiny_model_files(tmp_path):
    from g2e_jax.models.qwen2_vl.hf_files import write_processor_files

    cfg = ImageConfig.from_preprocessor_config(write_processor_files(tmp_path))
    assert (cfg.min_pixels, cfg.max_pixels, cfg.resample) == (*SMALL, Image.Resampling.BICUBIC)


# ---- Load errors ----

SOURCE = "row 12 (id 'q7'), field 'image'"


def _raises(image, *needles):
    with pytest.raises(ImageError) as info:
        load_image(image, source=SOURCE)
    msg = str(info.value)
    for needle in (SOURCE, *needles):
        assert needle in msg, msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    _raises(path, str(path), "not found")
    _raises(str(tmp_path), str(tmp_path), "not a file")


def test_not_an_image(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("definitely not a PNG\n")
    _raises(path, str(path), "cannot read image file")


@pytest.mark.parametrize("lenient_global", [False, True])
def test_truncated_png(tmp_path, monkeypatch, lenient_global):
    path = tmp_path / "cut.png"
    _rgb(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # Another library may have made Pillow accept truncated files globally; we must still refuse them.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_global)
    _raises(path, str(path), "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_global  # restored
    # A lazily-opened PIL image with the same damage is caught too.
    with pytest.raises(ImageError, match="truncated"):
        load_image(Image.open(path), source=SOURCE)


def test_zero_size():
    _raises(Image.new("RGB", (0, 5)), "zero size", "0x5")


def test_aspect_ratio(tmp_path):
    path = tmp_path / "strip.png"
    _rgb(201, 1).save(path)
    _raises(path, str(path), "aspect ratio 201.0")
    assert load_image(_rgb(1, 200), source=SOURCE).size == (1, 200)  # exactly 200 is allowed, as smart_resize


def test_wrong_type():
    _raises(np.zeros((4, 4, 3), dtype=np.uint8), "ndarray")


def test_load_converts_and_closes(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 2), (0, 0, 0, 0)).save(path)
    img = load_image(path, source=SOURCE)
    assert img.mode == "RGB" and np.all(np.asarray(img) == 255)  # transparent -> white, as HF
