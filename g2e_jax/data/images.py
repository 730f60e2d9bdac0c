"""Qwen2-VL image preprocessing on the host (numpy + PIL), bit-exact with transformers.

Mirrors ``transformers``' ``Qwen2VLImageProcessorPil`` step by step so that training and evaluation need
neither torch nor transformers, and so that every step can fail with a message that names the offending row:

1. ``load_image``: open + full decode (truncated files fail) + RGB conversion (alpha composited on white).
2. ``resize_for_resolution``: the optional Gen2Embed/VLM2Vec pre-resize (``--image_resolution``).
3. ``smart_resize``: both sides multiples of ``patch_size * merge_size``, pixel count within bounds (bicubic).
4. rescale by 1/255 (in float64, then float32, as HF), normalize with mean/std (float32).
5. patchify: rows ordered by (merge block row, merge block col, row in block, col in block), each row laid out
   as (C, T, P, P) with the single frame repeated ``temporal_patch_size`` times.

``preprocess_uint8`` stops before step 4 (uint8, one frame: what prepared datasets store) and
``expand_patches`` finishes steps 4-5 on its output; ``preprocess`` is the two together.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, which Qwen2-VL uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The Qwen2-VL processor's own defaults (its hub configs may raise max_pixels, e.g. to 12845056).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

# smart_resize refuses anything more elongated; we refuse it earlier, with the row named.
MAX_ASPECT_RATIO = 200

# Gen2Embed/VLM2Vec `process_image`: fixed square pre-resizes, plus the aspect-adaptive "random" mode.
SQUARE_RESOLUTIONS = {"low": 128, "clip": 336, "mid_low": 448, "mid": 672, "mid_high": 768, "high": 1344}
RESOLUTIONS = (*SQUARE_RESOLUTIONS, "random")


class ImageError(ValueError):
    """An input image that cannot be used; the message names where it came from."""


def _check_resolution(resolution: str | None) -> None:
    if resolution is not None and resolution not in RESOLUTIONS:
        raise ValueError(f"unknown image resolution {resolution!r}; valid: None, {', '.join(RESOLUTIONS)}")


@dataclass(frozen=True)
class ImageConfig:
    """Image-processor settings; defaults are Qwen2-VL's (as ``Qwen2VLImageProcessorPil``)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    # Gen2Embed/VLM2Vec pre-resize applied before smart_resize; None keeps the original size.
    resolution: str | None = None

    def __post_init__(self):
        # Lists from JSON would make the (frozen) config unhashable.
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        object.__setattr__(self, "resample", int(self.resample))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean/image_std need 3 (RGB) values, got {self.image_mean}, {self.image_std}"
            )
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        _check_resolution(self.resolution)

    @property
    def factor(self) -> int:
        """Side-length multiple required by the vision tower (one merged token = factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one row of ``preprocess``' patches: C * T * P * P."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_preprocessor_config(cls, path_or_dir: str | os.PathLike, *, resolution: str | None = None):
        """Read a HF ``preprocessor_config.json`` (a file, or the model directory holding it).

        Pixel bounds follow ``Qwen2VLImageProcessorPil.__init__``: legacy top-level ``min_pixels`` /
        ``max_pixels`` override ``size: {shortest_edge, longest_edge}``. Switched-off steps are refused
        rather than silently ignored, since the output would no longer match the model's processor.
        """
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        raw = json.loads(path.read_text(encoding="utf-8"))
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(flag) is False:
                raise ValueError(f"{path}: {flag}=false is not supported by g2e_jax.data.images")

        size = dict(raw.get("size") or {})
        min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS))
        max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS))
        if raw.get("min_pixels") is not None:
            min_pixels = raw["min_pixels"]
        if raw.get("max_pixels") is not None:
            max_pixels = raw["max_pixels"]

        kwargs = {
            k: raw[k]
            for k in (
                "patch_size",
                "temporal_patch_size",
                "merge_size",
                "image_mean",
                "image_std",
                "rescale_factor",
            )
            if raw.get(k) is not None
        }
        if raw.get("resample") is not None:
            kwargs["resample"] = raw["resample"]
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), resolution=resolution, **kwargs)


# ---- Loading ----

# Pillow reads the module-global ImageFile.LOAD_TRUNCATED_IMAGES at decode time; any library may have set it
# to True, which makes truncated files decode "successfully" into partly grey images. We force it off while we
# decode, reference-counted so that concurrent loads in threads neither serialize nor restore it too early.
_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncated_flag = False


@contextmanager
def _strict_decoding():
    global _strict_depth, _saved_truncated_flag
    with _strict_lock:
        if _strict_depth == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _convert_to_rgb(img: Image.Image) -> Image.Image:
    # Same as transformers.image_transforms.convert_to_rgb: transparency is composited onto white.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(image: Image.Image | str | os.PathLike, *, source: str) -> Image.Image:
    """Fully decode ``image`` (a PIL image or a path) into RGB, or raise ``ImageError`` naming ``source``.

    Decoding happens here, not lazily in the batch pipeline, so a bad file fails with its row and path.
    """
    if isinstance(image, Image.Image):
        where = source
        try:
            with _strict_decoding():
                image.load()
                img = _convert_to_rgb(image)
        except Exception as err:
            raise ImageError(f"{where}: cannot decode image: {type(err).__name__}: {err}") from err
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        where = f"{source} ('{path}')"
        if not path.exists():
            raise ImageError(f"{where}: image file not found")
        if not path.is_file():
            raise ImageError(f"{where}: image path is not a file")
        if path.stat().st_size == 0:
            raise ImageError(f"{where}: zero-size image file (0 bytes)")
        try:
            with _strict_decoding(), Image.open(path) as opened:
                opened.load()
                img = _convert_to_rgb(opened)
        except Exception as err:
            raise ImageError(
                f"{where}: cannot read image file (unreadable, truncated or not an image): "
                f"{type(err).__name__}: {err}"
            ) from err
    else:
        raise ImageError(f"{source}: expected a PIL image or a file path, got {type(image).__name__}")

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{where}: image has zero size ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{where}: aspect ratio {ratio:.1f} ({width}x{height}) exceeds {MAX_ASPECT_RATIO}, "
            "which Qwen2-VL's smart_resize refuses"
        )
    return img


# ---- Resizing ----


def resize_for_resolution(img: Image.Image, resolution: str | None) -> Image.Image:
    """The Gen2Embed/VLM2Vec ``process_image`` pre-resize, applied before the Qwen2-VL processor.

    Square modes call ``img.resize((s, s))`` without a filter, like the reference (Pillow's default: bicubic).
    ``"random"`` is the reference's name for its fallback branch, which is deterministic and aspect-adaptive:
    clamp the aspect ratio to 2 by stretching the short side, shrink so the long side is <= 992, grow so the
    short side is >= 336 (the latter wins; after the clamp both can never fire together), LANCZOS.
    """
    _check_resolution(resolution)
    if resolution is None:
        return img
    if resolution in SQUARE_RESOLUTIONS:
        side = SQUARE_RESOLUTIONS[resolution]
        return img.resize((side, side))
    w, h = img.size
    # Float arithmetic and int() truncation kept exactly as in the reference.
    if max(w, h) > 2 * min(w, h):
        if w > h:
            h = w / 2
        else:
            w = h / 2
    min_dim, max_dim = min(w, h), max(w, h)
    scale = 1.0
    if max_dim > 992:
        scale = 992 / max_dim
    if min_dim < 336:
        scale = 336 / min_dim
    return img.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of ``factor``, pixels within bounds, aspect ~kept.

    Same arithmetic as transformers' ``smart_resize`` (including Python's round-half-to-even).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---- Pixels -> patches ----


def _patchify(chw: np.ndarray, cfg: ImageConfig, *, frames: int | None = None) -> tuple[np.ndarray, int, int]:
    """``[C, H, W]`` -> ``[grid_h * grid_w, C * frames * P * P]``; ``frames`` defaults to the temporal patch."""
    channels, height, width = chw.shape
    p, m = cfg.patch_size, cfg.merge_size
    t = cfg.temporal_patch_size if frames is None else frames
    grid_h, grid_w = height // p, width // p
    x = chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    # A still image is its own clip of `t` identical frames (the vision tower's first conv is 3D).
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(grid_h * grid_w, channels * t * p * p)), grid_h, grid_w


def _load_resized(image: Image.Image | str | os.PathLike, cfg: ImageConfig, *, source: str) -> Image.Image:
    """Steps 1-3: the RGB image at the size the vision tower sees."""
    img = resize_for_resolution(load_image(image, source=source), cfg.resolution)
    height, width = img.height, img.width
    try:
        new_h, new_w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as err:
        raise ImageError(f"{source}: {err}") from err
    if new_h <= 0 or new_w <= 0:
        raise ImageError(f"{source}: {width}x{height} resizes to nothing with min_pixels={cfg.min_pixels}")
    return img.resize((new_w, new_h), resample=cfg.resample)


def _uint8_patches(img: Image.Image, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(img, dtype=np.uint8)
    patches, grid_h, grid_w = _patchify(pixels.transpose(2, 0, 1), cfg, frames=1)
    return patches, np.array([1, grid_h, grid_w], dtype=np.int64)


def preprocess_uint8(
    image: Image.Image | str | os.PathLike, cfg: ImageConfig, *, source: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches uint8 ``[grid_h*grid_w, C*P*P]``, grid_thw int64 ``[3]``).

    The resized pixels before rescale/normalize, in ``preprocess``' patch order and without the temporal
    copies: a quarter of float32's bytes per frame, so prepared datasets can store them. ``expand_patches``
    turns them into exactly ``preprocess``' output.
    """
    return _uint8_patches(_load_resized(image, cfg, source=source), cfg)


def expand_patches(patches_u8: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """``preprocess_uint8`` patches -> ``preprocess``' float32 ``[N, C*T*P*P]``, bit for bit.

    The same elementwise float ops in the same order as transformers (rescale in float64, cast to float32,
    normalize in float32), so the layout change does not change a single bit.
    """
    p, t = cfg.patch_size, cfg.temporal_patch_size
    patches_u8 = np.asarray(patches_u8)
    if patches_u8.dtype != np.uint8 or patches_u8.ndim != 2 or patches_u8.shape[1] != 3 * p * p:
        raise ValueError(
            f"expected uint8 patches [N, {3 * p * p}] (C*P*P for patch_size={p}), "
            f"got {patches_u8.dtype} {patches_u8.shape}"
        )
    n = patches_u8.shape[0]
    x = (patches_u8.reshape(n, 3, 1, p, p).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1, 1)
    std = np.asarray(cfg.image_std, dtype=np.float32).reshape(3, 1, 1, 1)
    x = (x - mean) / std
    return np.ascontiguousarray(np.broadcast_to(x, (n, 3, t, p, p)).reshape(n, 3 * t * p * p))


def preprocess(
    image: Image.Image | str | os.PathLike, cfg: ImageConfig, *, source: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches float32 ``[grid_t*grid_h*grid_w, C*T*P*P]``, grid_thw int64 ``[3]``)."""
    # HF rescales in float64 then casts, and normalizes in float32; expand_patches does that in the same
    # order (patchifying first is a permutation, so it changes no value).
    patches_u8, grid = preprocess_uint8(image, cfg, source=source)
    return expand_patches(patches_u8, cfg), grid


def num_image_tokens(grid_thw: Sequence[int] | np.ndarray, merge_size: int) -> int:
    """LLM-side placeholder count for one image: each merge_size x merge_size patch block is one token."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {t}x{h}x{w} is not divisible by merge_size={merge_size}")
    return t * h * w // merge_size**2
