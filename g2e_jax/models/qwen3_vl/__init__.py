"""Qwen3-VL backbone (Flax NNX): the common decoder with q/k norms, interleaved M-RoPE and DeepStack; its
family's (Qwen2-VL's) rope index (equal to Qwen3-VL's for images), image processor and chat format; its
vision tower with learned interpolated positions and DeepStack mergers."""

from g2e_jax.models.qwen2_vl.rope import SCHEMES, rope_index
from g2e_jax.models.qwen3_vl.checkpoint import BACKBONE, NAME_MAP, load, save
from g2e_jax.models.qwen3_vl.config import QWEN3_VL_2B, QWEN3_VL_8B, Qwen3VisionConfig, Qwen3VLConfig, tiny_config
from g2e_jax.models.qwen3_vl.model import Qwen3VL

__all__ = [
    "BACKBONE",
    "NAME_MAP",
    "QWEN3_VL_2B",
    "QWEN3_VL_8B",
    "SCHEMES",
    "Qwen3VL",
    "Qwen3VLConfig",
    "Qwen3VisionConfig",
    "load",
    "rope_index",
    "save",
    "tiny_config",
]
