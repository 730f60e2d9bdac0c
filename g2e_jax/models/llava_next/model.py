"""LLaVA-NeXT in Flax NNX: CLIP tower, projector, anyres packing, and Qwen2-VL's decoder module run as
Llama/Mistral (1-D RoPE, no q/k/v biases), returning final-norm hidden states.

Inputs are what transformers' ``LlavaNextProcessor`` returns: ``pixel_values`` ``[I, tiles, C, S, S]``
(or the tiles concatenated, ``[T, C, S, S]``) and ``image_sizes`` ``[I, 2]``. Called eagerly, the packing
index and the positions are derived on the host; under ``jit`` the caller passes
``image_feature_index`` (``anyres.feature_index``, padded with anything) and ``position_ids``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.llava_next import anyres
from g2e_jax.models.llava_next.config import LlavaNextConfig
from g2e_jax.models.llava_next.vision import ClipVisionTower
from g2e_jax.models.qwen2_vl.layers import activation, linear
from g2e_jax.models.qwen2_vl.model import _host_value, scatter_image_features
from g2e_jax.models.qwen2_vl.text import TextDecoder


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaNextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(cfg.vision.embed_dim, cfg.text.hidden_size, **kw)
        self.linear_2 = linear(cfg.text.hidden_size, cfg.text.hidden_size, **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNext(nnx.Module):
    def __init__(self, config: LlavaNextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.vision_tower = ClipVisionTower(config.vision, **kw)
        self.multi_modal_projector = Projector(config, **kw)
        self.image_newline = nnx.Param(jnp.zeros((config.text.hidden_size,), param_dtype))
        self.text = TextDecoder(config.text, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else linear(config.text.hidden_size, config.text.vocab_size, bias=False, **kw)
        )

    def image_features(self, pixel_values, image_feature_index):
        """Image token features ``[len(index), H]``: projected tile features gathered by the index,
        ``image_newline`` where it is -1."""
        v = self.config.vision
        tiles = jnp.asarray(pixel_values).reshape(-1, v.in_channels, v.image_size, v.image_size)
        features = self.vision_tower(tiles, self.config.feature_layers)[:, 1:]  # CLS dropped ("default")
        features = self.multi_modal_projector(features).reshape(-1, self.config.text.hidden_size)
        index = jnp.asarray(image_feature_index)
        newline = self.image_newline[...].astype(features.dtype)
        return jnp.where((index == anyres.NEWLINE)[:, None], newline, features[jnp.maximum(index, 0)])

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        position_ids=None,
        *,
        image_feature_index=None,
        prefix=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """Final-layer hidden states after the final norm, ``[B, L, H]`` (see ``Qwen2VL.__call__`` for
        ``prefix``, ``output_hidden_states`` and ``output_attentions``). Positions default to 0..L-1, as
        transformers' Llama/Mistral use without ``position_ids``."""
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        window = self.config.sliding_window
        if window is not None and length + (0 if prefix is None else prefix[0][0].shape[0]) > window:
            raise ValueError(f"sequence length {length} exceeds Mistral's sliding_window {window}, "
                             "which this port does not implement")  # fmt: skip
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if position_ids is None:
            if prefix is not None:
                raise ValueError("position_ids are required with a prefix: they continue after it")
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        embeds = self.text.embed_tokens(input_ids)
        if pixel_values is not None:
            if image_feature_index is None:
                image_feature_index = self._host_feature_index(input_ids, pixel_values, image_sizes)
            features = self.image_features(pixel_values, image_feature_index)
            embeds = scatter_image_features(input_ids, embeds, features, self.config.image_token_id)
        return self.text(
            embeds, jnp.asarray(attention_mask), position_ids, prefix=prefix,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )  # fmt: skip

    def prefix_kv(self, ids):
        """Keys and values of a text segment ``[P]`` that starts every row (the system prompt)."""
        return self.text.prefix_kv(self.text.embed_tokens(jnp.asarray(ids)))

    def _host_feature_index(self, input_ids, pixel_values, image_sizes):
        sizes, ids = _host_value(image_sizes), _host_value(input_ids)
        if sizes is None or ids is None:
            raise ValueError(
                "under jit, pass image_feature_index (g2e_jax.models.llava_next.anyres.feature_index)"
            )
        shape = np.shape(pixel_values)
        index = anyres.feature_index(sizes, self.config, shape[1] if len(shape) == 5 else None)
        tiles = shape[0] * shape[1] if len(shape) == 5 else shape[0]
        needed = max(int(index.max()) // self.config.tokens_per_tile + 1, 0) if index.size else 0
        if needed > tiles:
            raise ValueError(f"image_sizes need {needed} tiles but pixel_values holds {tiles}")
        tokens = int((ids == self.config.image_token_id).sum())
        if tokens != index.size:
            raise ValueError(
                f"input_ids hold {tokens} <image> tokens but image_sizes give {index.size} image features"
            )
        return index
