"""What every backbone's image processor shares (host, numpy): OpenAI CLIP's normalisation constants,
transformers' rescale-then-normalise arithmetic, and reading a ``preprocessor_config.json``. Decoding
image files is the data floor's (``g2e_jax.data.images``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: Qwen2-VL's and LLaVA-NeXT's processors both use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rescale_normalize(
    pixels_u8: np.ndarray, rescale_factor: float, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 pixels ``[N, C, ...]`` -> float32 as transformers does it, bit for bit: rescale in float64,
    cast to float32, normalise per channel (axis 1) in float32."""
    x = (np.asarray(pixels_u8).astype(np.float64) * rescale_factor).astype(np.float32)
    shape = (len(mean),) + (1,) * (x.ndim - 2)
    return (x - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


def read_preprocessor_config(path_or_dir: str | os.PathLike, refused: Sequence[str], reader: str):
    """(path, parsed dict) of a ``preprocessor_config.json`` (a file, or the model directory holding it).
    The ``do_*`` steps in ``refused`` switched off are refused, naming the file and the ``reader``
    module: the output would no longer match the model's processor."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    for flag in refused:
        if raw.get(flag) is False:
            raise ValueError(f"{path}: {flag}=false is not supported by {reader}")
    return path, raw
