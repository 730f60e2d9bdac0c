"""The text decoder every backbone runs: grouped-query attention with M-RoPE, SwiGLU MLP, RMSNorm.

Qwen2-VL's and Qwen2.5-VL's decoder as it is; LLaVA-NeXT's Llama/Mistral decoder with no q/k/v biases
(``attention_bias``) and 1-D RoPE, which is M-RoPE with a single section spanning the half head (every
frequency follows axis 0); Qwen3-VL's with q/k RMSNorms (``qk_norm``), interleaved M-RoPE sections
(``mrope_interleaved``) and DeepStack (vision features added after the first decoder layers, ``deepstack``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.common.config import TextConfig
from g2e_jax.models.common.layers import (
    GatedMLP,
    RMSNorm,
    apply_rotary,
    attention,
    attention_with_probs,
    embed,
    linear,
    scan_layers,
    stack_layers,
)
from g2e_jax.mesh import constrain

RESIDUAL = ("activation_batch", "activation_length", "activation_embed")  # logical axes of [B, L, H]


def mrope_angles(position_ids, cfg: TextConfig):
    """cos/sin ``[B, L, head_dim]`` from ``[3, B, L]`` positions.

    Frequency j of the half head takes its position from axis (section of j) % 3: the first
    ``mrope_section[0]`` frequencies follow time, the next height, the last width. One section of
    ``head_dim / 2`` frequencies is plain 1-D RoPE on axis 0. Interleaved (Qwen3-VL): frequency j
    follows height if j % 3 == 1 and j < 3 * sections[1], width if j % 3 == 2 and j < 3 * sections[2],
    time otherwise.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq  # [3, B, L, dim/2]
    if cfg.mrope_interleaved:
        j, sections = np.arange(dim // 2), cfg.mrope_section
        axis_of_freq = np.zeros(dim // 2, np.int64)
        for axis in (1, 2):
            axis_of_freq[(j % 3 == axis) & (j < 3 * sections[axis])] = axis
    else:
        axis_of_freq = np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section)
    freqs = jnp.moveaxis(freqs, 0, -1)[..., np.arange(axis_of_freq.size), axis_of_freq]  # [B, L, dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        qkv = dict(axes=("embed", "heads"), bias=cfg.attention_bias, **kw)
        self.q_proj = linear(cfg.hidden_size, self.num_heads * self.head_dim, **qkv)
        self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, **qkv)
        self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, **qkv)
        self.o_proj = linear(
            self.num_heads * self.head_dim, cfg.hidden_size, axes=("heads", "embed"), bias=False, **kw
        )
        # Qwen3: each head's q and k RMS-normalised over head_dim before the rotation.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, mask, prefix=None, output_attentions: bool = False):
        """Output and this call's rotated (k, v); ``prefix`` (k, v) ``[P, Hk, D]`` are keys and values of
        earlier tokens shared by every row, attended to before the row's own. ``output_attentions``
        (static) adds the attention probabilities ``[B, H, L, P + L]`` as a third result."""
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos.astype(q.dtype), sin.astype(q.dtype))
        k = apply_rotary(k, cos.astype(k.dtype), sin.astype(k.dtype))
        keys, values = k, v
        if prefix is not None:
            keys, values = (
                jnp.concatenate([jnp.broadcast_to(p.astype(t.dtype), (b,) + p.shape), t], axis=1)
                for p, t in zip(prefix, (k, v))
            )
        if output_attentions:
            out, probs = attention_with_probs(q, keys, values, mask)
            return self.o_proj(out.reshape(b, length, -1)), (k, v), probs
        return self.o_proj(attention(q, keys, values, mask).reshape(b, length, -1)), (k, v)


class TextMLP(GatedMLP):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, axes=("embed", "mlp"), bias=False, **kw
        )


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = TextAttention(cfg, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = TextMLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, prefix=None, output_attentions: bool = False):
        out, kv, *probs = self.attn(self.input_norm(x), cos, sin, mask, prefix, output_attentions)
        x = x + out
        return x + self.mlp(self.post_attn_norm(x)), kv, *probs


class TextDecoder(nnx.Module):
    """Input embeddings ``[B, L, H]`` -> final-norm hidden states (and optionally every layer's)."""

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                  embedding_init=nnx.initializers.normal(0.02), dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)  # fmt: skip
        self.layers = stack_layers(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_hidden_layers, rngs
        )  # one stacked module: parameters [layers, ...], run by ``scan_layers``
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        embeds,
        attention_mask,
        position_ids,
        *,
        prefix=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        remat=None,
        scan_unroll: int = 1,
        deepstack=None,
    ):
        """``prefix``: the (k, v) of a segment that precedes every row (``prefix_kv``: ``[layers, P, Hk,
        D]`` each); the rows' positions then continue after it. The result equals running the
        concatenated sequence. ``output_hidden_states`` also returns a tuple of every layer's hidden
        states (embeddings first, the final-norm states last); ``output_attentions`` (static; off, the
        program is unchanged) a tuple of each layer's attention probabilities ``[B, H, L, L]`` (after
        the hidden states when both are asked for). ``remat`` (a checkpoint policy) checkpoints each
        layer; ``scan_unroll`` layers run per scan iteration (see ``scan_layers``).

        ``deepstack`` (Qwen3-VL): ``(slots [B, L] int, features [D, N, H])``: after decoder layer j < D,
        ``features[j, slots]`` is added to the hidden states where ``slots >= 0`` (the visual tokens'
        feature rows). The hidden states of ``output_hidden_states`` are the layers' outputs before
        that addition, as transformers records them."""
        x, hidden, _, attentions = self._layers(
            embeds, attention_mask, position_ids, prefix, output_attentions=output_attentions,
            hidden_states=output_hidden_states, remat=remat, scan_unroll=scan_unroll, deepstack=deepstack,
        )  # fmt: skip
        x = self.norm(x)
        out = (x,)
        if output_hidden_states:
            n = self.cfg.num_hidden_layers
            out += ((embeds,) + tuple(hidden[i] for i in range(n - 1)) + (x,),)
        if output_attentions:
            out += (tuple(attentions[i] for i in range(self.cfg.num_hidden_layers)),)
        return out if len(out) > 1 else x

    def prefix_kv(self, embeds, *, remat=None, scan_unroll: int = 1):
        """Rotated (k, v), each ``[layers, P, Hk, D]``, of one segment ``[P, H]`` at positions 0..P-1:
        computed once, they stand in for that segment at the start of every row (causal attention
        never lets it see what follows)."""
        length = embeds.shape[0]
        positions = jnp.broadcast_to(jnp.arange(length)[None, None], (3, 1, length))
        _, _, (k, v), _ = self._layers(embeds[None], jnp.ones((1, length), bool), positions, None, kv=True,
                                       remat=remat, scan_unroll=scan_unroll)  # fmt: skip
        return k[:, 0], v[:, 0]

    def _layers(self, embeds, attention_mask, position_ids, prefix, *, output_attentions: bool = False,
                hidden_states: bool = False, kv: bool = False, remat=None, scan_unroll: int = 1,
                deepstack=None):  # fmt: skip
        """Every decoder layer, one scan: (last output, then stacked on a leading layer axis, each
        asked for: each layer's output, each layer's (k, v), each layer's attention probabilities;
        None where not asked for)."""
        length = embeds.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        # [B, 1 (heads), Lq, Lk]: causal and never attending to padded keys.
        mask = (causal[None] & attention_mask.astype(bool)[:, None, :])[:, None]
        if prefix is not None:
            seen = jnp.ones(mask.shape[:3] + (prefix[0].shape[1],), bool)  # every row sees the prefix
            mask = jnp.concatenate([seen, mask], axis=-1)
        cos, sin = mrope_angles(position_ids, self.cfg)

        def body(layer, x, xs):
            p, index = xs
            x, layer_kv, *probs = layer(x, cos, sin, mask, p, output_attentions)
            x = constrain(x, RESIDUAL)
            out = x
            if deepstack is not None:
                x = constrain(x + _deepstack_add(deepstack, index, x.dtype), RESIDUAL)
            return x, (out if hidden_states else None, layer_kv if kv else None, probs[0] if probs else None)

        index = None if deepstack is None else jnp.arange(self.cfg.num_hidden_layers)
        x = constrain(embeds, RESIDUAL)
        x, (hidden, kvs, attentions) = scan_layers(self.layers, body, x, (prefix, index), remat=remat,
                                                   unroll=scan_unroll)  # fmt: skip
        return x, hidden, kvs, attentions


def _deepstack_add(deepstack, layer, dtype):
    """What DeepStack adds after decoder ``layer`` (traced): ``features[layer]`` at the visual slots,
    zeros past the last feature level (the level is picked from the compact ``[D, N, H]`` features, so
    the scan carries no per-layer ``[B, L, H]`` copies)."""
    slots, features = deepstack
    levels = features.shape[0]
    level = features[jnp.minimum(layer, levels - 1)]  # [N, H]
    added = level[jnp.clip(slots, 0, level.shape[0] - 1)]  # [B, L, H]
    return jnp.where(((slots >= 0) & (layer < levels))[..., None], added, 0).astype(dtype)
