"""Qwen2-VL's image processor on the host (numpy + PIL), bit-exact with transformers'
``Qwen2VLImageProcessorPil``, step by step, so that training and evaluation need neither torch nor
transformers, and every step can fail with a message that names the offending row:

1. ``load_image`` and 2. ``resize_for_resolution`` (``g2e_jax.data.images``): decode, optional pre-resize.
3. ``smart_resize``: both sides multiples of ``patch_size * merge_size``, pixel count within bounds (bicubic).
4. rescale by 1/255 (in float64, then float32, as HF), normalize with mean/std (float32).
5. patchify: rows ordered by (merge block row, merge block col, row in block, col in block), each row laid out
   as (C, T, P, P) with the single frame repeated ``temporal_patch_size`` times.

``preprocess_uint8`` stops before step 4 (uint8, one frame: what prepared datasets store) and
``expand_patches`` finishes steps 4-5 on its output; ``preprocess`` is the two together. Qwen2.5-VL, of
the same family, uses this processor unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from g2e_jax.data.images import (
    MAX_ASPECT_RATIO,
    ImageError,
    check_resolution,
    load_image,
    resize_for_resolution,
)
from g2e_jax.models.common.images import CLIP_MEAN, CLIP_STD, read_preprocessor_config, rescale_normalize

# The Qwen2-VL processor's own defaults (its hub configs may raise max_pixels, e.g. to 12845056).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


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
        check_resolution(self.resolution)

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
        _, raw = read_preprocessor_config(
            path_or_dir, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"), __name__
        )
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


def load_resized(image: Image.Image | str | os.PathLike, cfg: ImageConfig, *, source: str) -> Image.Image:
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


def uint8_patches(img: Image.Image, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Step 5 on the resized image's uint8 pixels, one frame: (patches ``[grid_h*grid_w, C*P*P]``,
    grid_thw)."""
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
    return uint8_patches(load_resized(image, cfg, source=source), cfg)


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
    x = patches_u8.reshape(n, 3, 1, p, p)
    x = rescale_normalize(x, cfg.rescale_factor, cfg.image_mean, cfg.image_std)
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
