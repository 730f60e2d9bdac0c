"""Qwen2-VL backbone (Flax NNX): its vision tower on the common decoder (``g2e_jax.models.common``), its
host-side rope index and image processor, and HF checkpoint conversion. ``TextConfig`` (the common
decoder's config) is exported here too, as before it moved."""

from g2e_jax.models.common.config import TextConfig
from g2e_jax.models.qwen2_vl.checkpoint import BACKBONE, NAME_MAP, load, save
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionConfig
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
