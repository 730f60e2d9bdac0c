"""Qwen2.5-VL in Flax NNX: Qwen2-VL's model (text decoder, image-feature scatter, positions, checks)
with the windowed vision tower."""

from __future__ import annotations

from g2e_jax.models.qwen2_5_vl.vision import Qwen2_5VisionTower
from g2e_jax.models.qwen2_vl.model import Qwen2VL


class Qwen2_5VL(Qwen2VL):
    vision_tower = Qwen2_5VisionTower
