"""Image files on the host (PIL): decoded in full into RGB, or refused with a message that names the
offending row, and the optional Gen2Embed/VLM2Vec pre-resize. What a backbone's image processor makes of
the image afterwards is the backbone's (``g2e_jax.models.qwen2_vl.images``,
``g2e_jax.models.llava_next.images``).

1. ``load_image``: open + full decode (truncated files fail) + RGB conversion (alpha composited on white).
2. ``resize_for_resolution``: the optional Gen2Embed/VLM2Vec pre-resize (``--image_resolution``).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile

# Qwen2-VL's smart_resize refuses anything more elongated; we refuse it earlier, with the row named.
MAX_ASPECT_RATIO = 200

# Gen2Embed/VLM2Vec `process_image`: fixed square pre-resizes, plus the aspect-adaptive "random" mode.
SQUARE_RESOLUTIONS = {"low": 128, "clip": 336, "mid_low": 448, "mid": 672, "mid_high": 768, "high": 1344}
RESOLUTIONS = (*SQUARE_RESOLUTIONS, "random")


class ImageError(ValueError):
    """An input image that cannot be used; the message names where it came from."""


def check_resolution(resolution: str | None) -> None:
    """Refuses a pre-resize mode that ``resize_for_resolution`` does not know."""
    if resolution is not None and resolution not in RESOLUTIONS:
        raise ValueError(f"unknown image resolution {resolution!r}; valid: None, {', '.join(RESOLUTIONS)}")


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
    """The Gen2Embed/VLM2Vec ``process_image`` pre-resize, applied before the backbone's processor.

    Square modes call ``img.resize((s, s))`` without a filter, like the reference (Pillow's default: bicubic).
    ``"random"`` is the reference's name for its fallback branch, which is deterministic and aspect-adaptive:
    clamp the aspect ratio to 2 by stretching the short side, shrink so the long side is <= 992, grow so the
    short side is >= 336 (the latter wins; after the clamp both can never fire together), LANCZOS.
    """
    check_resolution(resolution)
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
