"""Qwen2-VL backbone (Flax NNX), its host-side rope index and HF checkpoint conversion."""

from g2e_jax.models.qwen2_vl.checkpoint import BACKBONE, NAME_MAP, load, save
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from g2e_jax.models.qwen2_vl.model import Qwen2VL
from g2e_jax.models.qwen2_vl.rope import SCHEMES, rope_index

__all__ = [
    "BACKBONE",
    "NAME_MAP",
    "SCHEMES",
    "Qwen2VL",
    "Qwen2VLConfig",
    "TextConfig",
    "VisionConfig",
    "load",
    "rope_index",
    "save",
]
