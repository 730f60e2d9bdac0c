"""Qwen2-VL <-> Hugging Face checkpoints: one name table, used by both ``load`` and ``save``.

The rule groups that Qwen2.5-VL shares (patch embedding, vision attention, merger, text decoder,
transformers 5 aliases) are defined here and reused by ``g2e_jax.models.qwen2_5_vl.checkpoint``.
"""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone
from g2e_jax.models.name_map import FLATTEN_CONV, TRANSPOSE, NameMap, Rule
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, tiny_config
from g2e_jax.models.qwen2_vl.model import Qwen2VL


def linears(hf: str, nnx: str, names, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch Linears ``{hf}.{n}`` <-> ``nnx.Linear`` ``{nnx}.{n}``: weight (transposed) and bias."""
    rules = [Rule(f"{hf}.{n}.weight", f"{nnx}.{n}.kernel", TRANSPOSE) for n in names]
    return tuple(rules + [Rule(f"{hf}.{n}.bias", f"{nnx}.{n}.bias") for n in names if bias])


def norms(hf: str, nnx: str, names, *, bias: bool) -> tuple[Rule, ...]:
    """LayerNorm (``bias``) or RMSNorm weights: ``weight`` <-> ``scale``."""
    rules = [Rule(f"{hf}.{n}.weight", f"{nnx}.{n}.scale") for n in names]
    return tuple(rules + [Rule(f"{hf}.{n}.bias", f"{nnx}.{n}.bias") for n in names if bias])


BLOCK = ("visual.blocks.{i}", "visual.blocks.{i}")
PATCH_EMBED = (Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", FLATTEN_CONV),)
VISION_ATTENTION = linears(*BLOCK, ("attn.qkv", "attn.proj"))
MERGER_MLP = (
    Rule("visual.merger.mlp.0.weight", "visual.merger.fc1.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.0.bias", "visual.merger.fc1.bias"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.fc2.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.2.bias", "visual.merger.fc2.bias"),
)
TEXT = (
    Rule("model.embed_tokens.weight", "text.embed_tokens.embedding"),
    *linears("model.layers.{i}.self_attn", "text.layers.{i}.attn", ("q_proj", "k_proj", "v_proj"), bias=True),
    *linears("model.layers.{i}.self_attn", "text.layers.{i}.attn", ("o_proj",), bias=False),
    *linears(
        "model.layers.{i}.mlp", "text.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"), bias=False
    ),
    Rule("model.layers.{i}.input_layernorm.weight", "text.layers.{i}.input_norm.scale"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "text.layers.{i}.post_attn_norm.scale"),
    Rule("model.norm.weight", "text.norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", TRANSPOSE),
)
# transformers 5 in-memory names -> hub names.
ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))

NAME_MAP = NameMap(
    rules=(
        *PATCH_EMBED,
        *norms(*BLOCK, ("norm1", "norm2"), bias=True),  # LayerNorm
        *VISION_ATTENTION,
        *linears(*BLOCK, ("mlp.fc1", "mlp.fc2")),
        *norms("visual.merger", "visual.merger", ("ln_q",), bias=True),
        *MERGER_MLP,
        *TEXT,
    ),
    aliases=ALIASES,
)

BACKBONE = Backbone("qwen2_vl", Qwen2VLConfig, Qwen2VL, NAME_MAP, tiny_config)
load, save = BACKBONE.load, BACKBONE.save
