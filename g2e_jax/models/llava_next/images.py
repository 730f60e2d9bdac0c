"""LLaVA-NeXT image preprocessing on the host (numpy + PIL), equal to transformers'
``LlavaNextImageProcessorPil``: the base tile (the whole image resized to one tile) and the tiles of the
best grid pinpoint (aspect-preserving bicubic resize, centred zero padding, row-major tiles), rescaled in
float64, cast to float32 and normalised in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image

from g2e_jax.data.images import ImageError, load_image, resize_for_resolution
from g2e_jax.models.common.images import CLIP_MEAN, CLIP_STD, read_preprocessor_config, rescale_normalize
from g2e_jax.models.llava_next.anyres import Geometry, image_layout, select_best_resolution
from g2e_jax.models.llava_next.config import PINPOINTS_336


@dataclasses.dataclass(frozen=True)
class LlavaImageConfig:
    tile_size: int = 336  # size.shortest_edge == crop_size
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS_336
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    patch_size: int = 14  # the vision tower's (processor_config.json): the anyres layout counts patches
    resolution: str | None = (
        None  # Gen2Embed's optional pre-resize (g2e_jax.data.images.resize_for_resolution)
    )

    def __post_init__(self):
        # Lists from JSON (a prepared dataset's metadata) would make the frozen config unhashable.
        object.__setattr__(self, "image_grid_pinpoints",
                           tuple(tuple(int(x) for x in p) for p in self.image_grid_pinpoints))  # fmt: skip
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @classmethod
    def from_preprocessor_config(cls, path_or_dir: str | os.PathLike, *, resolution: str | None = None):
        """Reads a ``LlavaNextImageProcessor`` ``preprocessor_config.json`` (or the directory holding it);
        settings this port does not reproduce are refused, naming the file."""
        flags = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad", "do_center_crop")
        path, raw = read_preprocessor_config(path_or_dir, flags, __name__)
        size, crop = dict(raw.get("size") or {}), dict(raw.get("crop_size") or {})
        side = size.get("shortest_edge", size.get("height"))
        if side is None or crop.get("height", side) != side or crop.get("width", side) != side:
            raise ValueError(f"{path}: size {size} and crop_size {crop} must name one square tile size")
        d = cls()
        processor = path.parent / "processor_config.json"
        patch = (
            json.loads(processor.read_text(encoding="utf-8")).get("patch_size")
            if processor.is_file()
            else None
        )
        return cls(
            patch_size=int(patch or d.patch_size),
            tile_size=int(side),
            image_grid_pinpoints=tuple(
                tuple(int(x) for x in p) for p in raw.get("image_grid_pinpoints", d.image_grid_pinpoints)
            ),
            image_mean=tuple(float(x) for x in raw.get("image_mean", d.image_mean)),
            image_std=tuple(float(x) for x in raw.get("image_std", d.image_std)),
            resample=int(raw.get("resample", d.resample)),
            rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)),
            resolution=resolution,
        )

    @property
    def anyres(self) -> Geometry:
        return Geometry(self.image_grid_pinpoints, self.tile_size, self.tile_size // self.patch_size)


def _fit(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The aspect-preserving size inside the target (transformers' ``get_patch_output_size``)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def tiles_uint8(img: Image.Image, cfg: LlavaImageConfig) -> np.ndarray:
    """An RGB image -> uint8 tiles ``[1 + rows * cols, 3, S, S]``: the base tile, then the grid's."""
    s = cfg.tile_size
    target_h, target_w = select_best_resolution(img.height, img.width, cfg.image_grid_pinpoints)
    new_h, new_w = _fit(img.height, img.width, target_h, target_w)
    resized = np.asarray(img.resize((new_w, new_h), resample=cfg.resample), dtype=np.uint8).transpose(2, 0, 1)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas = np.zeros((3, target_h, target_w), np.uint8)
    canvas[:, top : top + new_h, left : left + new_w] = resized
    grid = canvas.reshape(3, target_h // s, s, target_w // s, s).transpose(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
    base = np.asarray(img.resize((s, s), resample=cfg.resample), dtype=np.uint8).transpose(2, 0, 1)
    return np.concatenate([base[None], grid])


def _tiles(image, cfg: LlavaImageConfig, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 tiles ``[tiles, 3, S, S]``, (height, width) of the image the processor saw)."""
    img = resize_for_resolution(load_image(image, source=source), cfg.resolution)
    if min(img.height, img.width) < 1:
        raise ImageError(f"{source}: empty image")
    return tiles_uint8(img, cfg), np.array([img.height, img.width], np.int64)


def preprocess(image, cfg: LlavaImageConfig, *, source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """One image (PIL or path) -> (pixel_values float32 ``[tiles, 3, S, S]``, image_size int64 ``[2]``
    as (height, width) of the image the processor saw)."""
    tiles, size = _tiles(image, cfg, source)
    return rescale_normalize(tiles, cfg.rescale_factor, cfg.image_mean, cfg.image_std), size


def preprocess_rows(image, cfg: LlavaImageConfig, *, source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """For the Embedder: (tiles flattened ``[tiles, 3*S*S]``, the anyres layout ``[3]``)."""
    pixels, (height, width) = preprocess(image, cfg, source=source)
    return pixels.reshape(pixels.shape[0], -1), image_layout(int(height), int(width), cfg)


def store_rows(image, cfg: LlavaImageConfig, *, source: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """What a prepared dataset stores: ``preprocess_rows`` before rescale/normalise (uint8 tiles
    ``[tiles, 3*S*S]``, the anyres layout); ``expand_rows`` finishes it bit for bit."""
    tiles, (height, width) = _tiles(image, cfg, source)
    return tiles.reshape(tiles.shape[0], -1), image_layout(int(height), int(width), cfg)


def expand_rows(rows_u8: np.ndarray, cfg: LlavaImageConfig) -> np.ndarray:
    """``store_rows``' uint8 tiles -> ``preprocess_rows``' float32 tiles (the same float ops, same order)."""
    s = cfg.tile_size
    rows_u8 = np.asarray(rows_u8)
    if rows_u8.dtype != np.uint8 or rows_u8.ndim != 2 or rows_u8.shape[1] != 3 * s * s:
        raise ValueError(
            f"expected uint8 tiles [N, {3 * s * s}] (3*S*S for tile_size={s}), got {rows_u8.dtype} {rows_u8.shape}"
        )
    pixels = rescale_normalize(rows_u8.reshape(-1, 3, s, s), cfg.rescale_factor, cfg.image_mean, cfg.image_std)
    return pixels.reshape(rows_u8.shape[0], -1)
