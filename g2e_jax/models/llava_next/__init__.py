"""LLaVA-NeXT backbone (Flax NNX): CLIP vision tower, projector, anyres tiling, and the common decoder
module (``g2e_jax.models.common``) as Llama/Mistral (1-D RoPE, no q/k/v biases)."""

from g2e_jax.models.llava_next.checkpoint import BACKBONE, NAME_MAP, load, save
from g2e_jax.models.llava_next.config import (
    LLAVA_V1_6_MISTRAL_7B,
    ClipVisionConfig,
    LlavaNextConfig,
    tiny_config,
)
from g2e_jax.models.llava_next.model import LlavaNext

__all__ = [
    "BACKBONE",
    "LLAVA_V1_6_MISTRAL_7B",
    "NAME_MAP",
    "ClipVisionConfig",
    "LlavaNext",
    "LlavaNextConfig",
    "load",
    "save",
    "tiny_config",
]
