"""Qwen3-VL in Flax NNX: Qwen2-VL's model (text decoder, image-feature scatter, positions, checks) with
Qwen3-VL's vision tower, whose DeepStack features go to the decoder with the visual slots they fill."""

from __future__ import annotations

import jax.numpy as jnp

from g2e_jax.models.qwen2_vl.model import Qwen2VL, scatter_image_features
from g2e_jax.models.qwen3_vl.vision import Qwen3VisionTower


def image_slots(input_ids, image_token_id: int):
    """``[B, L]``: the feature row of each ``<|image_pad|>`` slot (row-major, as the scatter fills them),
    -1 elsewhere."""
    is_image = input_ids == image_token_id
    index = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    return jnp.where(is_image, index, -1)


class Qwen3VL(Qwen2VL):
    vision_tower = Qwen3VisionTower

    def image_features(self, *args, **kwargs):
        """The merged features ``[num_patches / 4, hidden]`` (images concatenated); the DeepStack
        features are ``deepstack_features``'s."""
        return self.deepstack_features(*args, **kwargs)[0]

    def deepstack_features(self, pixel_values, image_grid_thw, max_patches_per_image: int | None = None, *,
                           remat=None, scan_unroll: int = 1):  # fmt: skip
        """(merged features ``[N, hidden]``, DeepStack features ``[taps, N, hidden]`` or None)."""
        return super().image_features(pixel_values, image_grid_thw, max_patches_per_image, remat=remat,
                                      scan_unroll=scan_unroll)  # fmt: skip

    def insert_images(self, input_ids, embeds, pixel_values, image_grid_thw, max_patches_per_image, *, remat,
                      scan_unroll):  # fmt: skip
        features, deepstack = self.deepstack_features(pixel_values, image_grid_thw, max_patches_per_image,
                                                      remat=remat, scan_unroll=scan_unroll)  # fmt: skip
        embeds = scatter_image_features(input_ids, embeds, features, self.config.image_token_id)
        if deepstack is None:
            return embeds, {}
        return embeds, {"deepstack": (image_slots(input_ids, self.config.image_token_id), deepstack)}
