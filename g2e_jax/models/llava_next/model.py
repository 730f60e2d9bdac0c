"""LLaVA-NeXT in Flax NNX: CLIP tower, projector, anyres packing, and the common decoder module run as
Llama/Mistral (1-D RoPE, no q/k/v biases), returning final-norm hidden states.

Inputs: transformers' ``LlavaNextProcessor`` output (``pixel_values`` ``[I, tiles, C, S, S]`` and
``image_sizes``), from which the layouts are derived on the host when called eagerly; or, as the
Embedder and jit use it, the tiles concatenated over images (``[T, C, S, S]`` or flattened
``[T, C*S*S]``, padding tiles at the end) with the images' layouts ``[I, 3]`` (``anyres.layouts``;
padding images ``[0, 0, 0]``) in the place of Qwen2-VL's ``image_grid_thw``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.common.layers import activation, linear, param
from g2e_jax.models.common.model import DecoderModel, host_value, positions_3d
from g2e_jax.models.llava_next import anyres
from g2e_jax.models.llava_next.config import LlavaNextConfig
from g2e_jax.models.llava_next.vision import ClipVisionTower


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaNextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Column- then row-parallel, as the merger of Qwen2-VL's tower into the decoder's width.
        self.linear_1 = linear(
            cfg.vision.embed_dim, cfg.text.hidden_size, axes=("vision_embed", "merge"), **kw
        )
        self.linear_2 = linear(cfg.text.hidden_size, cfg.text.hidden_size, axes=("merge", "embed"), **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNext(DecoderModel):
    def vision_parts(self, config: LlavaNextConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = ClipVisionTower(config.vision, **kw)
        self.multi_modal_projector = Projector(config, **kw)
        self.image_newline = param(jnp.zeros((config.text.hidden_size,), param_dtype), ("embed",))

    def tile_features(self, pixel_values, *, remat=None, scan_unroll: int = 1):
        """Projected patch features of every tile, ``[tiles * tokens_per_tile, H]`` (CLS dropped)."""
        v = self.config.vision
        tiles = jnp.asarray(pixel_values).reshape(-1, v.in_channels, v.image_size, v.image_size)
        features = self.vision_tower(tiles, self.config.feature_layers, remat=remat, scan_unroll=scan_unroll)
        features = features[:, 1:]
        return self.multi_modal_projector(features).reshape(-1, self.config.text.hidden_size)

    def image_features(self, pixel_values, image_layout, rank, *, remat=None, scan_unroll: int = 1):
        """Features of the image tokens of ranks ``rank`` (``arange(n)``: the first n image tokens)."""
        features = self.tile_features(pixel_values, remat=remat, scan_unroll=scan_unroll)
        index = anyres.feature_index(rank, image_layout, self.config)
        newline = self.image_newline[...].astype(features.dtype)
        return jnp.where((index == anyres.NEWLINE)[..., None], newline, features[jnp.maximum(index, 0)])

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_layout=None,
        position_ids=None,
        *,
        image_sizes=None,
        prefix=None,
        max_patches_per_image: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        remat=None,
        scan_unroll: int = 1,
    ):
        """Final-layer hidden states after the final norm, ``[B, L, H]`` (see ``Qwen2VL.__call__`` for
        ``prefix``, ``output_hidden_states``, ``output_attentions``, ``remat`` and ``scan_unroll``). Positions default to 0..L-1, as
        transformers' Llama/Mistral use without ``position_ids``. ``max_patches_per_image`` is Qwen2-VL's
        (tiles all have one size) and is ignored."""
        del max_patches_per_image
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        window = self.config.sliding_window
        if window is not None and length + (0 if prefix is None else prefix[0].shape[1]) > window:
            raise ValueError(
                f"sequence length {length} exceeds Mistral's sliding_window {window}, "
                "which this port does not implement"
            )
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if position_ids is None:
            if prefix is not None:
                raise ValueError("position_ids are required with a prefix: they continue after it")
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        position_ids = positions_3d(position_ids)
        embeds = self.text.embed_tokens(input_ids)
        if pixel_values is not None:
            if image_layout is None:
                pixel_values, image_layout = self._from_processor(input_ids, pixel_values, image_sizes)
            is_image = input_ids == self.config.image_token_id
            rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
            features = self.image_features(pixel_values, image_layout, rank, remat=remat, scan_unroll=scan_unroll)
            features = features.astype(embeds.dtype)
            embeds = jnp.where(is_image[..., None], features, embeds)
        return self.text(
            embeds,
            jnp.asarray(attention_mask),
            position_ids,
            prefix=prefix,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            remat=remat,
            scan_unroll=scan_unroll,
        )

    def _from_processor(self, input_ids, pixel_values, image_sizes):
        """The processor's ``[I, tiles, ...]`` pixels (padded per image) and ``image_sizes`` -> concatenated
        tiles and layouts, checked against the image tokens (on the host: not under jit)."""
        sizes, ids, pixels = host_value(image_sizes), host_value(input_ids), host_value(pixel_values)
        if sizes is None or ids is None or pixels is None:
            raise ValueError("under jit, pass concatenated tiles and image_layout (anyres.layouts)")
        layout = anyres.layouts(sizes, self.config)
        tiles = [anyres.num_tiles(h, w, self.config) for h, w in sizes.reshape(-1, 2).tolist()]
        if pixels.ndim == 5:
            if pixels.shape[0] != len(tiles) or max(tiles) > pixels.shape[1]:
                raise ValueError(
                    f"pixel_values {list(pixels.shape)} do not hold the tiles {tiles} of image_sizes"
                )
            pixels = np.concatenate([p[:t] for p, t in zip(pixels, tiles)])
        elif pixels.shape[0] < sum(tiles):
            raise ValueError(f"image_sizes need {sum(tiles)} tiles but pixel_values holds {pixels.shape[0]}")
        tokens, needed = (
            int((ids == self.config.image_token_id).sum()),
            anyres.num_image_tokens(layout, self.config),
        )
        if tokens != needed:
            raise ValueError(
                f"input_ids hold {tokens} <image> tokens but image_sizes give {needed} image features"
            )
        return pixels, layout
