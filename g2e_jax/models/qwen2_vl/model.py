"""Qwen2-VL in Flax NNX: vision tower + the common text decoder, returning final-norm hidden states.

Inputs are what the HF Qwen2-VL processor returns (numpy). Called eagerly, anything left out is
derived on the host (M-RoPE positions, the largest image). Under ``jit`` the caller passes
``position_ids`` (see ``rope_index``) and a static ``max_patches_per_image``; padding of sequence,
batch rows and patches to fixed buckets leaves the real positions unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.common.model import DecoderModel, host_value, positions_3d
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig
from g2e_jax.models.qwen2_vl.rope import rope_index
from g2e_jax.models.qwen2_vl.vision import VisionTower


def scatter_image_features(input_ids, embeds, features, image_token_id: int):
    """Puts feature k into the k-th ``<|image_pad|>`` slot of the batch (row-major)."""
    is_image = input_ids == image_token_id
    index = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


class Qwen2VL(DecoderModel):
    vision_tower = VisionTower  # Qwen2.5-VL's model is this one with its own tower

    def vision_parts(self, config: Qwen2VLConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.visual = self.vision_tower(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def image_features(self, pixel_values, image_grid_thw, max_patches_per_image: int | None = None, *,
                       remat=None, scan_unroll: int = 1):  # fmt: skip
        """Merged vision features ``[num_patches / merge**2, hidden]``, images concatenated."""
        if max_patches_per_image is None:
            grid = host_value(image_grid_thw)
            if grid is None:
                raise ValueError("image_grid_thw is traced (inside jit): pass a static max_patches_per_image")
            grid = grid.reshape(-1, 3)
            if (grid[:, 0] != 1).any():
                raise ValueError(
                    f"image_grid_thw temporal size must be 1 for images, got {grid[:, 0].tolist()}"
                )
            max_patches_per_image = int(grid.prod(-1).max()) if grid.size else 1
        return self.visual(jnp.asarray(pixel_values), jnp.asarray(image_grid_thw), max_patches_per_image,
                           remat=remat, scan_unroll=scan_unroll)  # fmt: skip

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        position_ids=None,
        *,
        prefix=None,
        max_patches_per_image: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        remat=None,
        scan_unroll: int = 1,
    ):
        """Final-layer hidden states after the final norm, ``[B, L, H]``.

        With ``output_hidden_states`` also returns every layer's hidden states (embeddings first,
        the last entry equal to the returned final-norm states), as transformers does. With
        ``output_attentions`` (a static flag: off, nothing is computed or compiled for it) also
        returns every decoder layer's attention probabilities ``[B, heads, L, L]`` in float32, equal to
        transformers' ``output_attentions=True`` with eager attention (after the hidden states when
        both are asked for). ``prefix``
        (``prefix_kv``) stands for a text segment before every row; positions must then continue after
        it (they cannot be derived here). ``remat`` (a checkpoint policy, e.g. for training) checkpoints
        each decoder layer and vision block; ``scan_unroll`` layers run per iteration of the layer scans
        (the same result and parameters; see ``scan_layers``).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        ids_host = host_value(input_ids)
        if ids_host is not None and pixel_values is not None:
            self._check_image_tokens(ids_host, host_value(image_grid_thw), np.shape(pixel_values)[0])
        if position_ids is None:
            if prefix is not None:
                raise ValueError("position_ids are required with a prefix: they continue after it")
            if ids_host is None:
                raise ValueError(
                    "position_ids are required under jit: compute them on the host with "
                    "g2e_jax.models.qwen2_vl.rope_index"
                )
            grid = None if image_grid_thw is None else host_value(image_grid_thw)
            position_ids = rope_index(ids_host, host_value(attention_mask), grid, self.config, "mrope")
        position_ids = positions_3d(position_ids)

        input_ids = jnp.asarray(input_ids)
        embeds, text_kw = self.text.embed_tokens(input_ids), {}
        if pixel_values is not None:
            embeds, text_kw = self.insert_images(input_ids, embeds, pixel_values, image_grid_thw,
                                                 max_patches_per_image, remat=remat, scan_unroll=scan_unroll)  # fmt: skip
        return self.text(
            embeds, jnp.asarray(attention_mask), position_ids, prefix=prefix,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, remat=remat,
            scan_unroll=scan_unroll, **text_kw,
        )  # fmt: skip

    def insert_images(self, input_ids, embeds, pixel_values, image_grid_thw, max_patches_per_image, *, remat,
                      scan_unroll):  # fmt: skip
        """The input embeddings with the image features in the ``<|image_pad|>`` slots, and the decoder's
        extra keyword arguments (none here; Qwen3-VL's DeepStack features)."""
        features = self.image_features(pixel_values, image_grid_thw, max_patches_per_image, remat=remat,
                                       scan_unroll=scan_unroll)  # fmt: skip
        return scatter_image_features(input_ids, embeds, features, self.config.image_token_id), {}

    def _check_image_tokens(self, input_ids, grid, num_patches):
        window = self.config.vision.spatial_merge_size**2
        grid = grid.reshape(-1, 3)
        needed = int(grid.prod(-1).sum())
        if needed > num_patches:
            raise ValueError(
                f"image_grid_thw describes {needed} patches but pixel_values holds {num_patches}"
            )
        tokens = int((input_ids == self.config.image_token_id).sum())
        if tokens != needed // window:
            raise ValueError(
                f"input_ids hold {tokens} <|image_pad|> tokens but image_grid_thw gives "
                f"{needed // window} image features"
            )
