"""Qwen2.5-VL backbone (Flax NNX): the common decoder, and its family's (Qwen2-VL's) rope index, image
processor and checkpoint rule groups, with the windowed RMSNorm/SwiGLU vision tower."""

from g2e_jax.models.qwen2_5_vl.checkpoint import BACKBONE, NAME_MAP, load, save
from g2e_jax.models.qwen2_5_vl.config import (
    QWEN2_5_VL_3B,
    QWEN2_5_VL_7B,
    Qwen2_5VisionConfig,
    Qwen2_5VLConfig,
    tiny_config,
)
from g2e_jax.models.qwen2_5_vl.model import Qwen2_5VL
from g2e_jax.models.qwen2_vl.rope import SCHEMES, rope_index

__all__ = [
    "BACKBONE",
    "NAME_MAP",
    "QWEN2_5_VL_3B",
    "QWEN2_5_VL_7B",
    "SCHEMES",
    "Qwen2_5VL",
    "Qwen2_5VLConfig",
    "Qwen2_5VisionConfig",
    "load",
    "rope_index",
    "save",
    "tiny_config",
]
