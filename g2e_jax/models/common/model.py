"""What every backbone's model shares around its vision part: the text decoder, the untied ``lm_head``,
the prefix cache's keys and values, and the host/traced test of its inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.common.layers import linear
from g2e_jax.models.common.text import TextDecoder


def host_value(x):
    """The array as numpy if it is concrete, None if it is a tracer (inside jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def positions_3d(position_ids):
    """``[B, L]`` (one position per token) or ``[3, B, L]`` positions as the decoder's ``[3, B, L]``."""
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    return position_ids


class DecoderModel(nnx.Module):
    """A backbone's model: ``vision_parts`` (the subclass's), then the text decoder and, for an untied
    checkpoint, the ``lm_head`` (unused for embeddings, kept so that it survives load -> save)."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.vision_parts(config, **kw)
        self.text = TextDecoder(config.text, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else linear(
                config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"), bias=False, **kw
            )
        )

    def vision_parts(self, config, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        """Sets the modules and parameters before the decoder (created first, they draw from ``rngs``
        first). Each backbone's model class defines it; the base has no vision parts of its own."""
        raise NotImplementedError(f"{type(self).__name__} must define vision_parts (its vision tower)")

    def prefix_kv(self, ids, *, remat=None, scan_unroll: int = 1):
        """Keys and values, each ``[layers, P, Hk, D]``, of a text segment ``[P]`` that starts every row
        (the system prompt)."""
        return self.text.prefix_kv(self.text.embed_tokens(jnp.asarray(ids)), remat=remat, scan_unroll=scan_unroll)
